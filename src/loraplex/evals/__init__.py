"""Adapter evals: answer metrics, the promotion gate, and the engine run that feeds them."""
