"""Public and synthetic data: MovieLens-100k and -1M fetched (or taken from a local copy),
loaded and written as tidy tables a qarm.yaml can name (movielens.py); a seeded synthetic
world with ground truth (synthetic.py).
"""
