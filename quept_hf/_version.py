"""The package version (one place: `quept_hf.__version__`, and the metadata every save stamps)."""

__version__ = "0.1.0"
