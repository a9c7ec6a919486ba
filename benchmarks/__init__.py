"""The qarm-features benchmark suite (``python -m benchmarks``): every figure next to a baseline.

The machine these run on is shared and noisy, so no figure is reported alone: each is a
ratio against a baseline measured in the same run, interleaved (A B A B ..., medians) so
that contention hits both sides alike. See ``benchmarks/README.md``.
"""
