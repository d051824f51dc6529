"""The history's storage: formats (``formats.py``) beneath both caches (docs/memory.md)."""
