"""align: see docs/architecture.md."""
