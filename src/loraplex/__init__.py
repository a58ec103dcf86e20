"""loraplex: one base model, many LoRA adapters, served per request on vLLM."""

__version__ = "0.1.0"
