"""content: see docs/architecture.md."""
