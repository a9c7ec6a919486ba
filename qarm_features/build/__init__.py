"""The offline build: a team's tables read and checked (tables.py), the one pipeline from
catalog and events to a fitted item space (pipeline.py), version-named bundles
(bundles.py), stable code ids across retrains (stable.py), Ray stages (distributed.py,
ray_pairs.py) and the route a repo's qarm.yaml runs (repo.py).
"""
