"""The inference engine: vLLM's AsyncLLM behind a small protocol (fakes for unit tests)."""
