"""HTTP server: OpenAI-compatible routes over the embedded vLLM engine."""
