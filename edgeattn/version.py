"""The package version (read by the build and written into every exported file's metadata)."""

__version__ = "0.1.0"
