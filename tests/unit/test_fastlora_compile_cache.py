"""``compile_cache.allow_aot_load``: the compiled function vLLM's CPU platform saves can be
finalized on load (vLLM 0.32 calls ``finalize_loading`` on it; torch's callable lacks it)."""

from __future__ import annotations

import pytest

from loraplex.fastlora.compile_cache import allow_aot_load


def test_inductor_callable_gets_a_noop_finalize_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

    if "finalize_loading" in vars(Bundled):
        monkeypatch.delattr(Bundled, "finalize_loading")

    def compiled(*args: object) -> str:
        return "ran"

    compiled.serialize = lambda: b""  # type: ignore[attr-defined]
    loaded = Bundled(compiled)
    with pytest.raises(AttributeError, match="finalize_loading"):
        loaded.finalize_loading(None)  # the failure vLLM logs at every restart

    assert allow_aot_load()
    assert loaded.finalize_loading(None) is None
    assert loaded() == "ran"  # calling the compiled function is unchanged
    assert allow_aot_load()  # idempotent
