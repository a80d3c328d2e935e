"""lmforge's version, importable without the package face (`lmforge/__init__.py` imports the API)."""

__version__ = "0.1.0"
