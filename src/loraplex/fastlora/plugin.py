"""loraplex's vLLM plugin entry points: the platform for fast CPU LoRA (with its on/off
switch), and the general plugin that reads adapters with less work per tensor, keeps 16-bit CPU
output independent of the batch and, with ``merge_hot`` on, keeps the base weights that a hot
adapter is merged into.

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

PLATFORM = "loraplex.fastlora.platform.FastLoraCpuPlatform"
STOCK_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"

logger = logging.getLogger(__name__)


def fast_lora_enabled() -> bool:
    """The ``fast_lora`` setting (``LORAPLEX_FAST_LORA=on|off``, loraplex.toml; default on).

    Raises ``SettingsError`` on a value loraplex cannot use.
    """
    from loraplex.config import load_settings

    return load_settings().fast_lora == "on"


def platform_plugin() -> str | None:
    """vLLM platform plugin: the fast-LoRA CPU platform, or None to leave vLLM's choice.

    In the processes vLLM starts it first detaches them from the server's process group
    (``loraplex.engine.detach``), fast LoRA or not: this is the hook vLLM runs there.
    """
    from loraplex.config import SettingsError
    from loraplex.engine.detach import detach_engine_process

    detach_engine_process()

    try:
        enabled = fast_lora_enabled()
    except SettingsError as exc:
        logger.error("%s; using vLLM's stock CPU LoRA ops", exc.message)
        return None
    if not enabled:
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() != STOCK_CPU_PLATFORM:
        return None
    return PLATFORM


def general_plugin() -> None:
    """vLLM general plugin (run in each vLLM process before it builds a model): adapters are
    read in one call per file (``adapter_read``); on CPU, 16-bit linear layers never compute a
    single row (``row_invariance``), so a request's greedy output does not depend on its
    batch."""
    from vllm.platforms import current_platform

    from loraplex.engine.adapter_read import read_adapters_whole

    read_adapters_whole()

    if current_platform.is_cpu():
        from loraplex.fastlora.row_invariance import pad_16_bit_linears

        pad_16_bit_linears()
        if _merge_hot_enabled():
            from loraplex.fastlora.merge import keep_base_weights

            keep_base_weights()


def _merge_hot_enabled() -> bool:
    """The ``merge_hot`` setting (it needs ``fast_lora``); False (with an error logged) when
    settings are unusable."""
    from loraplex.config import SettingsError, load_settings

    try:
        settings = load_settings()
        return settings.merge_hot == "on" and settings.fast_lora == "on"
    except SettingsError as exc:
        logger.error("%s; not merging hot adapters", exc.message)
        return False
