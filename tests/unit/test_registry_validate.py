"""Adapter validation: every bad input is refused with a message naming the problem."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loraplex.adapters import LINEAR_PROJECTIONS, WEIGHTS_FILE
from loraplex.errors import IncompatibleAdapter, InvalidAdapter, LoraplexError, TooLarge
from loraplex.registry.basedims import BaseDims
from loraplex.registry.validate import BaseSpec, validate_adapter
from loraplex.testing.random_adapters import write_random_adapter


@pytest.fixture
def adapter(tmp_path: Path, tiny_dims: BaseDims) -> Path:
    return write_random_adapter(tmp_path / "ad", tiny_dims, rank=4, targets=("q_proj", "v_proj"))


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(folder / WEIGHTS_FILE)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def _refused(folder: Path, base: BaseSpec, kind: type[LoraplexError], message: str) -> None:
    with pytest.raises(kind) as err:
        validate_adapter(folder, "ok", base)
    assert message in err.value.message, err.value.message


def test_a_good_adapter_passes(adapter: Path, tiny_base: BaseSpec) -> None:
    checked = validate_adapter(adapter, "sales_agent", tiny_base)
    assert (checked.rank, checked.alpha) == (4, 8.0)
    assert checked.target_modules == ["q_proj", "v_proj"]
    assert set(checked.files) == {"adapter_config.json", WEIGHTS_FILE}


def test_all_linear_and_regex_targets(
    tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec
) -> None:
    folder = write_random_adapter(
        tmp_path / "all",
        tiny_dims,
        targets=LINEAR_PROJECTIONS,
    )
    _edit_config(folder, target_modules="all-linear")
    assert len(validate_adapter(folder, "x", tiny_base).target_modules) == 7
    _edit_config(folder, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")
    assert len(validate_adapter(folder, "x", tiny_base).target_modules) == 7


@pytest.mark.parametrize("name", ["../etc", "Sales", "a/b", "", "x" * 65, "sales\n"])
def test_bad_name(adapter: Path, tiny_base: BaseSpec, name: str) -> None:
    with pytest.raises(InvalidAdapter, match="Invalid adapter name"):
        validate_adapter(adapter, name, tiny_base)


def test_pickle_bin_is_refused_and_never_unpickled(adapter: Path, tiny_base: BaseSpec) -> None:
    marker = adapter.parent / "unpickled"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (marker.write_text, ("boom",))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    _refused(adapter, tiny_base, InvalidAdapter, "holds pickle weights (adapter_model.bin)")
    assert not marker.exists()


def test_only_a_pickle_is_refused(tmp_path: Path, tiny_base: BaseSpec) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    _refused(folder, tiny_base, InvalidAdapter, "loraplex never unpickles")


def test_missing_weights(adapter: Path, tiny_base: BaseSpec) -> None:
    (adapter / WEIGHTS_FILE).unlink()
    _refused(adapter, tiny_base, InvalidAdapter, "has no adapter_model.safetensors")


def test_not_a_folder(tmp_path: Path, tiny_base: BaseSpec) -> None:
    _refused(tmp_path / "nope", tiny_base, InvalidAdapter, "is not a folder")


def test_lying_header_length(adapter: Path, tiny_base: BaseSpec) -> None:
    data = (adapter / WEIGHTS_FILE).read_bytes()
    (adapter / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**40) + data[8:])
    _refused(adapter, tiny_base, InvalidAdapter, "header length 1099511627776 exceeds")


def test_offsets_out_of_range(adapter: Path, tiny_base: BaseSpec) -> None:
    path = adapter / WEIGHTS_FILE
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**9
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length :])
    _refused(adapter, tiny_base, InvalidAdapter, "outside the")


def test_truncated_weights(adapter: Path, tiny_base: BaseSpec) -> None:
    path = adapter / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    _refused(adapter, tiny_base, InvalidAdapter, "not a valid safetensors file")


def test_config_not_json(adapter: Path, tiny_base: BaseSpec) -> None:
    (adapter / "adapter_config.json").write_text("{r: 4")
    _refused(adapter, tiny_base, InvalidAdapter, "adapter_config.json is not valid JSON")


def test_not_lora(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_config(adapter, peft_type="IA3")
    _refused(adapter, tiny_base, InvalidAdapter, "peft_type 'IA3'; only LoRA adapters are served")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "uses DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias != 'none'"),
        ({"r": 0}, "invalid rank r=0"),
        ({"r": "4"}, "invalid rank"),
        ({"lora_alpha": "x"}, "invalid lora_alpha"),
    ],
)
def test_unsupported_config(adapter: Path, tiny_base: BaseSpec, change: dict, message: str) -> None:
    _edit_config(adapter, **change)
    _refused(adapter, tiny_base, InvalidAdapter, message)


def test_rank_above_server_max(tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec) -> None:
    folder = write_random_adapter(tmp_path / "big", tiny_dims, rank=16)
    message = "rank 16 exceeds the server's maximum LoRA rank 8"
    _refused(folder, tiny_base, IncompatibleAdapter, message)


def test_rank_pattern_above_max(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_config(adapter, rank_pattern={"q_proj": 32})
    _refused(adapter, tiny_base, IncompatibleAdapter, "rank 32 exceeds")


def test_trained_on_another_base(adapter: Path, tiny_base: BaseSpec) -> None:
    (adapter / "loraplex.json").write_text(json.dumps({"base_fingerprint": "cd" * 32}))
    _refused(adapter, tiny_base, IncompatibleAdapter, "trained on a different base model")


def test_manifest_with_matching_base_is_kept(adapter: Path, tiny_base: BaseSpec) -> None:
    manifest = {"base_fingerprint": tiny_base.fingerprint, "n": 1}
    (adapter / "loraplex.json").write_text(json.dumps(manifest))
    assert validate_adapter(adapter, "ok", tiny_base).manifest == manifest


def test_target_module_missing_from_base(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_config(adapter, target_modules=["q_proj", "c_attn"])
    _refused(adapter, tiny_base, IncompatibleAdapter, "Target module 'c_attn' does not exist")


def test_shapes_of_another_base(tmp_path: Path, tiny_base: BaseSpec) -> None:
    """No manifest: an adapter made for wider layers is caught by its shapes."""
    other = BaseDims(128, 96, 4, 2, 32, 2)
    folder = write_random_adapter(tmp_path / "other", other)
    _refused(folder, tiny_base, IncompatibleAdapter, "the base model needs [4, 64]")


def test_layer_beyond_the_base(tmp_path: Path, tiny_base: BaseSpec) -> None:
    deeper = BaseDims(64, 96, 4, 2, 16, 3)
    folder = write_random_adapter(tmp_path / "deep", deeper)
    message = "model.layers.2.self_attn.q_proj, which the base"
    _refused(folder, tiny_base, IncompatibleAdapter, message)


def test_tensor_outside_target_modules(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_config(adapter, target_modules=["q_proj"])
    _refused(adapter, tiny_base, InvalidAdapter, "not in target_modules")


def test_half_a_module(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_tensors(
        adapter, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    )
    _refused(adapter, tiny_base, InvalidAdapter, "has only one of lora_A/lora_B")


def test_foreign_tensor_name(adapter: Path, tiny_base: BaseSpec) -> None:
    _edit_tensors(adapter, lambda t: t.update({"lm_head.weight": np.ones(2, np.float32)}))
    _refused(adapter, tiny_base, InvalidAdapter, "Tensor 'lm_head.weight' is not a LoRA weight")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf(adapter: Path, tiny_base: BaseSpec, bad: float) -> None:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(tensors: dict) -> None:
        tensors[key][3, 1] = bad

    _edit_tensors(adapter, poison)
    _refused(adapter, tiny_base, InvalidAdapter, f"Tensor '{key}' contains NaN or Inf")


def test_too_large(adapter: Path, tiny_base: BaseSpec) -> None:
    small = BaseSpec(tiny_base.fingerprint, tiny_base.dims, max_rank=8, max_bytes=1000)
    _refused(adapter, small, TooLarge, "over the 1,000-byte limit (LORAPLEX_MAX_ADAPTER_MB=")
    assert TooLarge.status_code == 413


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lm_head_and_embedding_lora_are_refused(
    adapter: Path, tiny_base: BaseSpec, target: str
) -> None:
    """The fast-LoRA plugin relies on it: lm_head LoRA slots stay zero (prompt logprobs)."""
    _edit_config(adapter, target_modules=["q_proj", target])
    _refused(adapter, tiny_base, IncompatibleAdapter, f"Target module '{target}' does not exist")
