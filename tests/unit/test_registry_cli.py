"""``loraplex adapters ...`` end to end through the real CLI entry point (SQLite, local blobs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_runner import run

from loraplex.registry.basedims import BaseDims
from loraplex.testing.random_adapters import write_random_adapter


def test_push_promote_rollback_show_delete(
    cli_env: Path, capsys: pytest.CaptureFixture[str], tiny_dims: BaseDims
) -> None:
    a = write_random_adapter(cli_env / "a", tiny_dims, seed=1)
    b = write_random_adapter(cli_env / "b", tiny_dims, seed=2)
    code, out, _ = run(capsys, "adapters", "push", str(a), "--name", "sales", "--tenant", "acme")
    assert code == 0 and re.fullmatch(r"sales@v1 [0-9a-f]{64}\n", out)
    sha = out.split()[1]
    code, out, err = run(capsys, "adapters", "push", str(a), "--name", "sales")
    assert (code, out) == (0, f"sales@v1 {sha}\n") and "identical content" in err
    code, out, _ = run(
        capsys, "adapters", "push", str(b), "--name", "sales", "--description", "v2 data"
    )
    assert out.startswith("sales@v2 ")
    code, out, _ = run(capsys, "adapters", "promote", "sales@v2", "--alias", "stable", "--force")
    assert out == "sales:stable -> sales@v2 (was sales@v1)\n"
    code, out, _ = run(capsys, "adapters", "rollback", "sales")
    assert out == "sales:stable -> sales@v1 (was sales@v2)\n"
    code, out, _ = run(capsys, "adapters", "show", "sales")
    assert "aliases: stable -> v1" in out and "by tester" in out and "forced" in out
    code, out, _ = run(capsys, "adapters", "show", "sales", "--json")
    data = json.loads(out)
    assert data["aliases"] == {"stable": "sales@v1"} and data["tenant"] == "acme"
    assert [v["version"] for v in data["versions"]] == ["sales@v1", "sales@v2"]
    code, out, _ = run(capsys, "adapters", "list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["sales"]
    code, out, _ = run(capsys, "adapters", "list")
    assert out.startswith("sales ") and "stable=v1" in out
    code, out, err = run(capsys, "adapters", "delete", "sales@v1")
    assert code == 2 and "error: sales@v1 is what alias stable points at" in err
    code, out, _ = run(capsys, "adapters", "delete", "sales@v2")
    assert (code, out) == (0, "deleted sales@v2\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "{a}", "--name", "../evil"], "Invalid adapter name '../evil'"),
        (["push", "{a}", "--name", "x", "--tenant", "t", "--shared"], "--tenant T or --shared"),
        (["push", "{env}/missing", "--name", "x"], "is not a folder"),
        (["promote", "ghost@v1"], "Adapter 'ghost' does not exist"),
        (["promote", "ghost"], "names no version"),
        (["rollback", "ghost"], "Adapter 'ghost' does not exist"),
        (["show", "ghost"], "Adapter 'ghost' does not exist"),
        (["delete", "ghost@v3"], "Adapter 'ghost' does not exist"),
    ],
)
def test_errors_are_one_line(
    cli_env: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_dims: BaseDims,
    args: list[str],
    message: str,
) -> None:
    a = write_random_adapter(cli_env / "a", tiny_dims)
    code, out, err = run(capsys, "adapters", *[x.format(a=a, env=cli_env) for x in args])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_push_without_prepared_base(
    cli_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(cli_env / "nowhere"))
    code, _, err = run(capsys, "adapters", "push", str(cli_env), "--name", "x")
    assert code == 2 and "run `loraplex model prepare` first" in err
