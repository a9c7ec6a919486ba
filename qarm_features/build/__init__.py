"""build: see docs/architecture.md."""
