"""loraplex.evals."""
