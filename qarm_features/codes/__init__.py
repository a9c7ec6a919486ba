"""Quantizers that turn aligned embeddings into trainable code ids: residual k-means
semantic ids (rq.py), top-K nearest pool items (vq.py), and the float64 re-scoring that
makes both row-independent (rescore.py). Estimators: fit / encode / decode.
"""
