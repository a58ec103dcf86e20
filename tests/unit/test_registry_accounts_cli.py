"""``loraplex tenants|keys|usage`` end to end through the real CLI entry point (SQLite)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cli_runner import run

from loraplex.registry.models import UsageRow
from loraplex.registry.registry import open_accounts


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LORAPLEX_HOME with the default SQLite registry."""
    monkeypatch.delenv("LORAPLEX_REGISTRY_URL", raising=False)
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    return tmp_path


def test_tenants(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tenants", "create", "acme", "--weight", "2", "--rpm", "60")
    assert code == 0
    assert out.split() == ["acme", "weight=2", "rpm=60", "tpm=-", "max_concurrency=-"]
    assert run(capsys, "tenants", "create", "beta")[0] == 0
    code, out, err = run(capsys, "tenants", "create", "acme")
    assert (
        code == 2
        and out == ""
        and err == "error: Tenant 'acme' already exists; see " + ("`loraplex tenants show`.\n")
    )
    code, _, err = run(capsys, "tenants", "create", "Bad Name")
    assert code == 2 and err.startswith("error: Invalid tenant name 'Bad Name'")

    code, out, _ = run(capsys, "tenants", "update", "acme", "--rpm", "0", "--max-concurrency", "3")
    assert out.split() == ["acme", "weight=2", "rpm=-", "tpm=-", "max_concurrency=3"]
    code, _, err = run(capsys, "tenants", "update", "acme")
    assert code == 2 and "Nothing to change" in err
    code, _, err = run(capsys, "tenants", "update", "acme", "--weight", "0")
    assert code == 2 and "weight must be a number > 0" in err

    code, out, _ = run(capsys, "tenants", "list")
    assert [line.split()[0] for line in out.splitlines()] == ["acme", "beta"]
    code, out, _ = run(capsys, "tenants", "list", "--json")
    listed = json.loads(out)
    assert [(t["name"], t["weight"], t["max_concurrency"]) for t in listed] == [
        ("acme", 2.0, 3),
        ("beta", 1.0, None),
    ]
    code, out, _ = run(capsys, "tenants", "show", "acme", "--json")
    assert json.loads(out) == {**listed[0], "keys": []}
    code, out, _ = run(capsys, "tenants", "show", "acme")
    assert out.startswith("acme ") and "keys: none" in out

    assert run(capsys, "tenants", "delete", "acme")[1] == "deleted tenant acme and its keys\n"
    code, _, err = run(capsys, "tenants", "show", "acme")
    assert (
        code == 2 and err == "error: Tenant 'acme' does not exist; see `loraplex tenants list`.\n"
    )
    code, _, err = run(capsys, "tenants", "delete", "acme")
    assert code == 2 and "does not exist" in err


def test_keys(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "tenants", "create", "acme")
    code, out, err = run(capsys, "keys", "create", "acme")
    assert code == 0 and re.fullmatch(r"lpx-[0-9a-f]{8}-[A-Za-z0-9_-]{32,}\n", out)
    key = out.strip()
    prefix = key[:12]
    assert f"created key {prefix} (id {prefix[4:]}) for tenant acme" in err and key not in err
    accounts = open_accounts()
    assert accounts.authenticate(key) == accounts.tenant("acme")

    code, out, _ = run(capsys, "keys", "list", "acme")
    assert out.startswith(f"{prefix}  acme") and out.rstrip().endswith("active")
    assert key[13:] not in out
    code, out, _ = run(capsys, "tenants", "show", "acme")
    assert f"  {prefix}  acme" in out

    code, out, _ = run(capsys, "keys", "revoke", prefix)
    assert (code, out) == (0, f"revoked {prefix} of tenant acme\n")
    assert accounts.authenticate(key) is None
    code, out, _ = run(capsys, "keys", "list", "acme", "--json")
    [listed] = json.loads(out)
    assert listed["prefix"] == prefix and listed["active"] is False and listed["revoked_at"]
    assert run(capsys, "keys", "revoke", prefix[4:])[0] == 0  # by bare id, again: no error
    code, _, err = run(capsys, "keys", "revoke", "lpx-00000000")
    assert code == 2 and "API key '00000000' does not exist" in err
    code, _, err = run(capsys, "keys", "create", "nobody")
    assert code == 2 and "Tenant 'nobody' does not exist" in err
    accounts.close()


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "usage")
    assert (code, out, err) == (0, "", "no usage recorded in that window\n")
    accounts = open_accounts()
    now = datetime.now(UTC)
    accounts.record_usage([UsageRow("acme", "sales@v1", 2, 30, 12)], at=now)
    accounts.record_usage([UsageRow("acme", "sales@v1", 1, 5, 5)], at=now - timedelta(hours=3))
    accounts.record_usage([UsageRow("beta", "smollm2-135m", 1, 7, 3)], at=now)
    accounts.close()

    code, out, _ = run(capsys, "usage", "--json")
    assert json.loads(out) == [
        {
            "tenant": "acme",
            "adapter": "sales@v1",
            "requests": 3,
            "prompt_tokens": 35,
            "completion_tokens": 17,
        },
        {
            "tenant": "beta",
            "adapter": "smollm2-135m",
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": 3,
        },
    ]
    code, out, _ = run(capsys, "usage", "--since", "-1h")
    lines = [line.split() for line in out.splitlines()]
    assert lines == [
        ["tenant", "adapter", "requests", "prompt", "completion"],
        ["acme", "sales@v1", "2", "30", "12"],
        ["beta", "smollm2-135m", "1", "7", "3"],
    ]
    code, out, _ = run(capsys, "usage", "--until", "-1h", "--tenant", "acme", "--json")
    assert [(r["requests"], r["prompt_tokens"]) for r in json.loads(out)] == [(1, 5)]
    until = (now + timedelta(minutes=2)).isoformat()
    code, out, _ = run(capsys, "usage", "--since", "-2h", "--until", until, "--json")
    assert [r["requests"] for r in json.loads(out)] == [2, 1]
    code, _, err = run(capsys, "usage", "--since", "last tuesday")
    assert code == 2 and err.startswith("error: Invalid time 'last tuesday'")
