"""The bundle: its typed manifest (manifest.py), the verified, immutable artifact
(artifact.py), the one encode the batch and request paths call (encode.py) and a seeded
random bundle for tests and benchmarks (testing.py). On the serving path: no torch.
"""
