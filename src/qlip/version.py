"""qlip's version (layer 0: what a saved file records, importable from every layer)."""

__version__ = "0.1.0"
