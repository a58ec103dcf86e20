"""``loraplex adapters ...``: push, list, show, promote, rollback, delete, gc.

A thin typer layer over ``Registry``: parse flags, call one method, print the result
(``--json`` for scripts). Errors are loraplex errors, printed by ``loraplex.cli.main``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from loraplex.adapters import DEFAULT_ALIAS
from loraplex.errors import Conflict, InvalidRequest
from loraplex.registry.models import AdapterRecord, EvalRecord

adapters_app = typer.Typer(help="The adapter registry: versions and aliases.", no_args_is_help=True)

AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _registry():  # type: ignore[no-untyped-def]
    from loraplex.registry.registry import open_registry

    return open_registry()


@adapters_app.command("push")
def push(
    folder: Annotated[Path, typer.Argument(help="Adapter folder (PEFT save_pretrained output).")],
    name: Annotated[str, typer.Option("--name", help="Adapter name, e.g. sales_agent.")],
    tenant: Annotated[
        str | None, typer.Option(help="Tenant that owns the name: only its keys may use it.")
    ] = None,
    shared: Annotated[
        bool, typer.Option("--shared", help="No owner: every tenant may use it (the default).")
    ] = False,
    description: Annotated[str | None, typer.Option(help="What this version is.")] = None,
    fallback_to_base: Annotated[
        bool | None,
        typer.Option(
            "--fallback-to-base/--no-fallback-to-base",
            help="Allow labelled fallback to the base model when this adapter cannot be served.",
        ),
    ] = None,
) -> None:
    """Validate and store an adapter as a new version NAME@vK; prints it and its sha256."""
    if shared and tenant is not None:
        raise InvalidRequest("Give --tenant T or --shared, not both.")
    result = _registry().push(
        folder, name, tenant=tenant, description=description, fallback_to_base=fallback_to_base
    )
    if not result.created:
        typer.echo(f"identical content is already {result.version.key}; nothing new", err=True)
    typer.echo(f"{result.version.key} {result.version.sha256}")


@adapters_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="Exact version NAME@vK.")],
    alias: AliasOpt = DEFAULT_ALIAS,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Promote even without a passing eval gate (recorded in the alias history).",
        ),
    ] = False,
    preload: Annotated[
        bool,
        typer.Option(
            "--preload",
            help="First have every live server load the version (no cold first requests).",
        ),
    ] = False,
    preload_timeout: Annotated[
        float, typer.Option(help="Seconds --preload waits for the servers' answers.")
    ] = 120.0,
) -> None:
    """Point an alias (default stable) at NAME@vK, atomically, once its eval gate passed."""
    registry = _registry()
    _require_gate(registry, version, force)
    if preload:
        _preload(registry, version, preload_timeout)
    previous, current = registry.promote(version, alias, force=force)
    name = current.split("@", 1)[0]
    typer.echo(f"{name}:{alias} -> {current}" + (f" (was {previous})" if previous else ""))


def _require_gate(registry, version: str, force: bool) -> None:  # type: ignore[no-untyped-def]
    """Refuse (``Conflict``, naming the eval command) unless NAME@vK passed its gate."""
    from loraplex.adapters import parse_version_key
    from loraplex.evals.gate import check_promotable

    ref = parse_version_key(version)
    warning = check_promotable(registry.show(ref.name), ref.number or 0, force)
    if warning:
        typer.secho(f"warning: {warning}", fg="yellow", err=True)


def _preload(registry, version: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Warm ``version`` on the live servers; refuse if one failed, warn about silent ones."""
    from loraplex.config import Settings

    live_within = 5 * Settings().heartbeat_seconds
    outcome = registry.preload(version, timeout=timeout, live_within=live_within)
    warm = sorted(s for s, e in outcome.acks.items() if e is None)
    typer.echo(f"preloaded {version} on {len(warm)} server(s)", err=True)
    if outcome.failed:
        problems = "; ".join(f"server {s}: {e}" for s, e in sorted(outcome.failed.items()))
        raise Conflict(f"{version} was not promoted: it could not be loaded on {problems}")
    if outcome.missing:
        typer.echo(
            f"warning: no answer within {timeout:g} s from {', '.join(outcome.missing)}; "
            "they load the version on first use",
            err=True,
        )


@adapters_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Adapter name.")], alias: AliasOpt = DEFAULT_ALIAS
) -> None:
    """Move an alias back to the version it pointed at before."""
    old, new = _registry().rollback(name, alias)
    typer.echo(f"{name}:{alias} -> {new} (was {old})")


@adapters_app.command("delete")
def delete(version: Annotated[str, typer.Argument(help="Exact version NAME@vK.")]) -> None:
    """Delete a version (refused while an alias points at it)."""
    typer.echo(f"deleted {_registry().delete(version).key}")


@adapters_app.command("gc")
def gc(
    yes: Annotated[bool, typer.Option("--yes", help="Delete them (default: only list).")] = False,
    grace_seconds: Annotated[
        float | None,
        typer.Option(help="Keep blobs put less than this ago (default LORAPLEX_GC_GRACE_SECONDS)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove stored blobs that no version references (a dry run unless --yes)."""
    from loraplex.config import Settings

    grace = Settings().gc_grace_seconds if grace_seconds is None else grace_seconds
    report = _registry().gc(grace_seconds=grace, delete=yes)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
        return
    for digest, age in report.orphans.items():
        state = "deleted" if digest in report.deleted else "unreferenced"
        typer.echo(f"{state} {digest} (stored {age / 3600:.1f} h ago)")
    typer.echo(
        f"{len(report.orphans)} unreferenced blob(s), {len(report.deleted)} deleted, "
        f"{len(report.kept_young)} younger than {grace:g} s kept, "
        f"{report.referenced} referenced" + ("" if yes else "; run with --yes to delete"),
        err=True,
    )


@adapters_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Adapters with their latest version and aliases."""
    records = _registry().list()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        typer.echo("no adapters; push one with `loraplex adapters push DIR --name NAME`", err=True)
    for rec in records:
        latest = rec.versions[-1].key if rec.versions else "-"
        aliases = " ".join(f"{a}=v{n}" for a, n in rec.aliases.items()) or "-"
        tenant = rec.tenant or "-"
        typer.echo(
            f"{rec.name:<24} tenant={tenant:<12} versions={len(rec.versions):<3} "
            f"latest={latest:<28} {aliases}"
        )


@adapters_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Adapter name.")], as_json: JsonOpt = False
) -> None:
    """Versions, aliases, alias history and eval results of one adapter."""
    record = _registry().show(name)
    if as_json:
        typer.echo(json.dumps(record.to_dict(), indent=2))
        return
    typer.echo(_describe(record))


def _describe(rec: AdapterRecord) -> str:
    """Human-readable text of ``show``."""
    lines = [
        f"{rec.name}  tenant={rec.tenant or '-'}  fallback_to_base={rec.fallback_to_base}",
        f"created {rec.created_at:%Y-%m-%d %H:%M:%S}Z by {rec.created_by}",
        "aliases: " + (", ".join(f"{a} -> v{n}" for a, n in rec.aliases.items()) or "none"),
        "versions:",
    ]
    for v in rec.versions:
        lines.append(
            f"  v{v.number:<4} {v.created_at:%Y-%m-%d %H:%M:%S}Z by {v.created_by:<12} "
            f"r={v.rank} alpha={v.alpha:g} {v.size / 2**20:.2f} MiB sha256={v.sha256[:16]} "
            f"modules={','.join(v.target_modules)} "
            f"format={(v.manifest or {}).get('prompt_format') or 'unknown'}"
            + (f"  {v.description}" if v.description else "")
        )
    if rec.events:
        lines.append("alias history:")
        for e in rec.events:
            moved = f"v{e.from_number} -> v{e.to_number}" if e.from_number else f"-> v{e.to_number}"
            flags = (" forced" if e.forced else "") + (" (undone)" if e.undone else "")
            lines.append(
                f"  {e.at:%Y-%m-%d %H:%M:%S}Z {e.by:<12} {e.action:<8} {e.alias} {moved}{flags}"
            )
    lines.append("eval results:" if rec.evals else "eval results: none")
    for ev in rec.evals:
        lines.append(_describe_eval(ev))
    return "\n".join(lines)


def _describe_eval(ev: EvalRecord) -> str:
    """One eval result: a gate verdict as its deciding scores, anything else as its JSON."""
    verdict = {True: "pass", False: "FAIL", None: "-"}[ev.passed]
    head = f"  v{ev.number:<4} {ev.created_at:%Y-%m-%d %H:%M:%S}Z by {ev.created_by:<12} {ev.suite}"
    if ev.reference is None or "decided_by" not in ev.metrics:
        return f"{head} {verdict} {json.dumps(ev.metrics)}"
    m = ev.metrics
    metric = m["decided_by"]
    text = (
        f"{head} {verdict}: {metric} {m['candidate'][metric]:.4f} vs {m['reference'][metric]:.4f}"
        f" of {ev.reference} (max drop {m['max_drop']:.0%}) "
        f"data sha256={(ev.data_sha256 or '-')[:16]} base={(ev.base_fingerprint or '-')[:12]}"
    )
    for side in ("candidate", "reference"):
        s = m[side]
        text += (
            f"\n      {side:<9} exact_match={s['exact_match']:.4f} token_f1={s['token_f1']:.4f} "
            f"rouge_l={s['rouge_l']:.4f} answer_loss={s['answer_loss']:.4f}"
        )
    return text
