"""The library's version, in one place (the package and model files read it)."""

__version__ = "0.2.0"
