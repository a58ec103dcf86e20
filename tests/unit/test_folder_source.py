"""``FolderAdapterSource``: names never become paths, every adapter is validated as a registry
push is, and what is served is a content-addressed snapshot whose key matches its bytes."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from adapter_files import served_dims, write_adapter_files
from safetensors.numpy import load_file, save_file

from loraplex import adapter_sources
from loraplex.adapter_sources import FolderAdapterSource
from loraplex.adapters import CONFIG_FILE, WEIGHTS_FILE, ResolvedAdapter
from loraplex.errors import IncompatibleAdapter, InvalidAdapter, LoraplexError, NotFound
from loraplex.registry.validate import BaseSpec

MakeSource = Callable[[Path], FolderAdapterSource]


@pytest.fixture
def make_source(tmp_path: Path) -> MakeSource:
    """Sources checked against the bundled model's dims (rank <= 8, 4 MiB)."""
    base = BaseSpec("ab" * 32, served_dims(), name="served", max_rank=8, max_bytes=4 << 20)
    return lambda root: FolderAdapterSource(root, base, tmp_path / "snapshots")


def content_key(adapter: ResolvedAdapter) -> str:
    """The version suffix that the bytes in the adapter's served folder must give."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        file_digest = hashlib.sha256((adapter.path / name).read_bytes()).hexdigest()
        digest.update(f"{name}\0{file_digest}\n".encode())
    return f"{adapter.name}@sha-{digest.hexdigest()[:12]}"


def test_versions_follow_content_and_name_the_served_bytes(
    adapters_root: Path, make_source: MakeSource
) -> None:
    source = make_source(adapters_root)
    first = source.resolve("sales")
    assert first.version == content_key(first) and source.resolve(first.version) == first
    assert first.checked_for == source.base  # the engine need not validate the snapshot again
    assert not first.path.is_relative_to(adapters_root)
    write_adapter_files(adapters_root / "sales", seed=9)
    second = source.resolve("sales")
    assert second.version != first.version and second.version == content_key(second)
    assert first.version == content_key(first)  # the old snapshot is untouched
    config = json.loads((adapters_root / "sales" / CONFIG_FILE).read_text())
    (adapters_root / "sales" / CONFIG_FILE).write_text(json.dumps({**config, "lora_alpha": 7}))
    assert source.resolve("sales").version not in (first.version, second.version)
    assert source.names() == ["sales", "support"]


@pytest.mark.parametrize("model", ["Sales", "sales@v2", "sales@sha-000000000000", "missing"])
def test_refuses_unknown(adapters_root: Path, make_source: MakeSource, model: str) -> None:
    with pytest.raises(NotFound):
        make_source(adapters_root).resolve(model)


@pytest.mark.parametrize(
    "model",
    ["..", "../outside/evil", "../outside/evil@v1", "team/sales", "sales\x00", "%2e%2e", "{out}"],
)
def test_refuses_paths_to_real_adapters(escapes: Path, make_source: MakeSource, model: str) -> None:
    model = model.format(out=escapes.parent / "outside" / "evil")
    with pytest.raises(NotFound, match="is not a valid adapter name"):
        make_source(escapes).resolve(model)


@pytest.mark.parametrize("model", ["link", "sneaky"])
def test_refuses_symlinks_out_of_its_root(
    escapes: Path, make_source: MakeSource, model: str
) -> None:
    source = make_source(escapes)
    with pytest.raises(NotFound, match="does not exist"):
        source.resolve(model)
    assert source.names() == ["sales", "support"]


def test_follows_symlinks_that_stay_inside(escapes: Path, make_source: MakeSource) -> None:
    (escapes / "alias").symlink_to(escapes / "sales", target_is_directory=True)
    source = make_source(escapes)
    assert source.resolve("alias").version.startswith("alias@sha-")
    assert source.names() == ["alias", "sales", "support"]


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _nan(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = np.nan
    save_file(tensors, folder / WEIGHTS_FILE)


def _raw_weights(folder: Path, header: dict, data: bytes, length: int | None = None) -> None:
    body = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    (folder / WEIGHTS_FILE).write_bytes(prefix + body + data)


_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_ADAPTERS: dict[str, tuple[Callable[[Path], None], type[LoraplexError], str]] = {
    "nan": (_nan, InvalidAdapter, "contains NaN or Inf"),
    "rank": (lambda f: _edit_config(f, r=16), IncompatibleAdapter, "maximum LoRA rank 8"),
    "dora": (lambda f: _edit_config(f, use_dora=True), InvalidAdapter, "uses DoRA"),
    "bias": (lambda f: _edit_config(f, bias="all"), InvalidAdapter, "bias != 'none'"),
    "modules-to-save": (
        lambda f: _edit_config(f, modules_to_save=["lm_head"]),
        InvalidAdapter,
        "uses modules_to_save",
    ),
    "module": (
        lambda f: _edit_config(f, target_modules=["q_proj", "conv1d"]),
        IncompatibleAdapter,
        "Target module 'conv1d' does not exist",
    ),
    "pickle": (
        lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04."),
        InvalidAdapter,
        "holds pickle weights (adapter_model.bin)",
    ),
    "pickle-only": (
        lambda f: (f / WEIGHTS_FILE).rename(f / "adapter_model.bin"),
        InvalidAdapter,
        "holds pickle weights (adapter_model.bin)",
    ),
    "no-weights": (
        lambda f: (f / WEIGHTS_FILE).unlink(),
        InvalidAdapter,
        "its folder has no adapter_model.safetensors",
    ),
    "header-2-63": (
        lambda f: _raw_weights(f, {}, b"", length=2**63),
        InvalidAdapter,
        "exceeds the 16777216-byte limit",
    ),
    "overlap": (
        lambda f: _raw_weights(
            f,
            {
                _A: {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
        InvalidAdapter,
        "overlaps another tensor",
    ),
    "dtype-x-shape": (
        lambda f: _raw_weights(
            f, {_A: {"dtype": "F32", "shape": [1, 576], "data_offsets": [0, 8]}}, b"\0" * 8
        ),
        InvalidAdapter,
        "needs 2304 bytes, its offsets span 8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_with_what_is_wrong(
    adapters_root: Path, make_source: MakeSource, case: str
) -> None:
    spoil, kind, message = BAD_ADAPTERS[case]
    spoil(adapters_root / "sales")
    source = make_source(adapters_root)
    with pytest.raises(kind) as err:
        source.resolve("sales")
    assert err.value.message.startswith("Adapter 'sales' is refused: ")
    assert message in err.value.message, err.value.message
    assert source.resolve("support").version.startswith("support@sha-")
    assert [p.name for p in source.snapshots.iterdir()] == [source.resolve("support").path.name]


def test_a_refusal_is_remembered_until_the_files_change(
    adapters_root: Path, make_source: MakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    validate = adapter_sources.validate_adapter
    monkeypatch.setattr(
        adapter_sources,
        "validate_adapter",
        lambda folder, *args: calls.append(folder) or validate(folder, *args),
    )
    _nan(adapters_root / "sales")
    source = make_source(adapters_root)
    for _ in range(5):
        with pytest.raises(InvalidAdapter, match="NaN"):
            source.resolve("sales")
    assert len(calls) == 1
    write_adapter_files(adapters_root / "sales", seed=11)
    assert source.resolve("sales").version.startswith("sales@sha-")
    assert source.resolve("sales").version.startswith("sales@sha-")
    assert len(calls) == 2


def test_an_edit_during_a_load_cannot_mix_versions(
    adapters_root: Path, make_source: MakeSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder changes after its files were copied, while the copy is validated: the key
    served still names the copied bytes, and the next request sees the edit."""
    validate = adapter_sources.validate_adapter
    edits = iter([lambda: write_adapter_files(adapters_root / "sales", seed=12)])

    def validate_then_edit(folder: Path, *args: object) -> object:
        checked = validate(folder, *args)
        next(edits, lambda: None)()
        return checked

    monkeypatch.setattr(adapter_sources, "validate_adapter", validate_then_edit)
    source = make_source(adapters_root)
    original = (adapters_root / "sales" / WEIGHTS_FILE).read_bytes()
    during = source.resolve("sales")
    assert during.version == content_key(during)
    assert (during.path / WEIGHTS_FILE).read_bytes() == original
    after = source.resolve("sales")
    assert after.version != during.version and after.version == content_key(after)
    assert (after.path / WEIGHTS_FILE).read_bytes() == (
        adapters_root / "sales" / WEIGHTS_FILE
    ).read_bytes()
