"""Test helpers (see the docstring written with the deduplication)."""
