"""Fast multi-LoRA on CPU for vLLM, installed through vLLM's platform-plugin entry point.

vLLM's CPU LoRA ops copy an adapter's full weights once per token. This package replaces
them with ops that read weights in place (``ops``), planned once per step (``plan``), and
hands them to vLLM as a punica wrapper (``punica``) of a CPU platform subclass (``platform``),
selected by the entry point in ``plugin`` (switch: ``LORAPLEX_FAST_LORA=on|off``).
Importing this package does not import vLLM or torch.
"""
