"""bundle: see docs/architecture.md."""
