"""codes: see docs/architecture.md."""
