"""Test support: hypothesis strategies (needs the ``test`` extra) and the tolerance model."""
