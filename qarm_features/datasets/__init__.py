"""Public and synthetic data: MovieLens-100k fetched, loaded and written as tidy tables a
qarm.yaml can name (movielens.py); a seeded synthetic world with ground truth
(synthetic.py).
"""
