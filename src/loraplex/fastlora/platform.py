"""vLLM CPU platform whose LoRA layers use loraplex's fast ops.

Everything is vLLM's ``CpuPlatform`` except the punica wrapper (the object every LoRA layer
calls for its matmuls) and that LoRA keeps torch.compile on. vLLM resolves this class through
the ``vllm.platform_plugins`` entry point (see ``plugin``) in every process that builds a model,
so worker processes get it too; importing it there also lets vLLM load its compile cache
(``compile_cache``), so a restart with the same settings skips torch.compile.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from loraplex.fastlora.compile_cache import allow_aot_load

PUNICA_WRAPPER = "loraplex.fastlora.punica.FastPunicaWrapperCPU"


class FastLoraCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with ``FastPunicaWrapperCPU`` as the punica wrapper."""

    @classmethod
    def get_punica_wrapper(cls) -> str:
        return PUNICA_WRAPPER

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        """vLLM's CPU settings, minus one: LoRA no longer turns torch.compile off.

        The stock CPU platform runs LoRA models eagerly because its LoRA ops are traced into
        the graph with one step's Python metadata. Ours run as one opaque custom op per
        layer (``loraplex::lora_linear``) that reads the current step's plan, so the base
        model keeps its compiled graph. ``enforce_eager`` still turns compilation off.
        """
        lora_config = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            super().check_and_update_config(vllm_config)
        finally:
            vllm_config.lora_config = lora_config


allow_aot_load()  # in every process that resolves this platform, vLLM's worker included
