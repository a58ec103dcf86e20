"""loraplex.registry."""
