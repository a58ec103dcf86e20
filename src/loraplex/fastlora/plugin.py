"""The vLLM platform-plugin entry point for fast CPU LoRA, and its on/off switch.

vLLM calls ``platform_plugin`` in each of its processes (API server, engine core, workers)
when it first resolves ``current_platform``. It returns the qualified name of
``FastLoraCpuPlatform`` when fast LoRA is on and vLLM would otherwise pick its stock
``CpuPlatform``; it returns None (vLLM keeps its own platform, stock LoRA ops) when
``LORAPLEX_FAST_LORA`` is off, when vLLM runs on another device, or on a CPU variant it does
not know (such as ZenCpuPlatform). It never imports vLLM at module level: loraplex must stay
importable where vLLM is absent.

vLLM skips platform plugins when ``VLLM_TARGET_DEVICE=cpu`` is set, so leave that unset.
"""

from __future__ import annotations

import logging
import os

ENV = "LORAPLEX_FAST_LORA"
PLATFORM = "loraplex.fastlora.platform.FastLoraCpuPlatform"
STOCK_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"
_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}

logger = logging.getLogger(__name__)


def fast_lora_enabled(environ: dict[str, str] | None = None) -> bool:
    """Read ``LORAPLEX_FAST_LORA`` (default on). Raises ValueError on an unknown value."""
    value = (os.environ if environ is None else environ).get(ENV, "on").strip().lower()
    if value in _ON or value == "":
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV}={value!r} is not understood: set it to 'on' or 'off'")


def platform_plugin() -> str | None:
    """vLLM platform plugin: the fast-LoRA CPU platform, or None to leave vLLM's choice."""
    try:
        enabled = fast_lora_enabled()
    except ValueError as exc:
        logger.error("%s; using vLLM's stock CPU LoRA ops", exc)
        return None
    if not enabled:
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() != STOCK_CPU_PLATFORM:
        return None
    return PLATFORM
