"""pairs: see docs/architecture.md."""
