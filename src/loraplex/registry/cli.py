"""``loraplex adapters ...``: push, list, show, promote, rollback, delete.

A thin typer layer over ``Registry``: parse flags, call one method, print the result
(``--json`` for scripts). Errors are loraplex errors, printed by ``loraplex.cli.main``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from loraplex.adapters import DEFAULT_ALIAS
from loraplex.errors import InvalidRequest
from loraplex.registry.models import AdapterRecord

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
        bool, typer.Option("--force", help="Mark the promote as forced in the alias history.")
    ] = False,
) -> None:
    """Point an alias (default stable) at NAME@vK, atomically."""
    previous, current = _registry().promote(version, alias, force=force)
    name = current.split("@", 1)[0]
    typer.echo(f"{name}:{alias} -> {current}" + (f" (was {previous})" if previous else ""))


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
        verdict = {True: "pass", False: "FAIL", None: "-"}[ev.passed]
        lines.append(
            f"  v{ev.number} {ev.suite} {verdict} {json.dumps(ev.metrics)} ({ev.created_by})"
        )
    return "\n".join(lines)
