"""The package version (a module of its own, so the bundle writer can record it)."""

__version__ = "0.1.0"
