"""qarm-features: QARM aligned embeddings and trainable code ids, served through Feast."""

__version__ = "0.1.0"
