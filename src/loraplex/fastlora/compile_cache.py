"""Make vLLM's torch.compile cache load on CPU, so a restart skips compilation.

vLLM 0.32 saves the compiled model (its AOT compile cache, ``VLLM_CACHE_ROOT/
torch_compile_cache/torch_aot_compile/<hash>``) but never loads it back on CPU: after
deserializing it calls ``compiled_fn.finalize_loading(vllm_config)``
(``vllm/compilation/decorators.py``, ``_try_load_aot_compiled_fn``), a method only vLLM's own
``VllmSerializableFunction`` has. The CPU platform compiles in ``DYNAMO_TRACE_ONCE`` mode with
torch's stock inductor backend, whose compiled function is torch's
``BundledAOTAutogradSerializableCallable``; it forwards unknown attributes to a plain function,
so every load fails with "'function' object has no attribute 'finalize_loading'" and vLLM
compiles again (upstream: vllm-project/vllm#32033, which #32037 worked around by turning AOT
compile off on CPU; the 0.32 default turns it back on; pytorch/pytorch#173090).

That callable needs no finalizing (torch already loaded its kernels while deserializing), so
``allow_aot_load`` gives it a no-op ``finalize_loading``. It must run in the process that
compiles the model (vLLM's worker): the fast-LoRA platform, which vLLM resolves there, calls it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _finalize_loading(self: object, vllm_config: object) -> None:
    """Nothing to finalize: torch loaded the compiled kernels when it deserialized them."""


def allow_aot_load() -> bool:
    """Give torch's bundled inductor callable the ``finalize_loading`` vLLM calls on load.

    Returns whether the patch is in place (False where this torch lacks the class, i.e. a
    layout this workaround does not know; vLLM then recompiles as before).
    """
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:
        return False
    if "finalize_loading" not in vars(BundledAOTAutogradSerializableCallable):
        BundledAOTAutogradSerializableCallable.finalize_loading = _finalize_loading  # type: ignore[attr-defined]
        log.debug("torch.compile cache: AOT artifacts of the inductor backend load on CPU")
    return True
