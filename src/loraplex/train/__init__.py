"""loraplex.train."""
