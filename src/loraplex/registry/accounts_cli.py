"""``loraplex tenants ...``, ``loraplex keys ...`` and ``loraplex usage``.

A thin typer layer over ``Accounts`` in the registry database of ``Settings()``: parse flags,
call one method, print the result (``--json`` for scripts). A new key is the only thing
printed on stdout by ``keys create``, once; errors are printed by ``loraplex.cli.main``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from loraplex.errors import InvalidRequest
from loraplex.registry.models import ApiKey, Tenant

tenants_app = typer.Typer(help="Tenants: fair-share weights and limits.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenants' API keys (only a hash is stored).", no_args_is_help=True)

TenantArg = Annotated[str, typer.Argument(help="Tenant name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
WeightOpt = Annotated[
    float | None, typer.Option(help="Share of the engine under contention, relative (> 0).")
]
RpmOpt = Annotated[int | None, typer.Option(help="Requests per minute; 0: no limit.")]
TpmOpt = Annotated[
    int | None, typer.Option(help="Prompt + completion tokens per minute; 0: no limit.")
]
ConcurrencyOpt = Annotated[
    int | None, typer.Option(help="Requests in flight at once; 0: no limit.")
]


def _accounts():  # type: ignore[no-untyped-def]
    from loraplex.registry.registry import open_accounts

    return open_accounts()


def _limits(**flags: Any) -> dict[str, Any]:
    """The flags that were given; a limit of 0 becomes None (no limit)."""
    return {
        name: (None if value == 0 and name != "weight" else value)
        for name, value in flags.items()
        if value is not None
    }


def _line(tenant: Tenant) -> str:
    """One line describing ``tenant``."""
    limits = " ".join(
        f"{name}={'-' if value is None else value}"
        for name, value in (
            ("rpm", tenant.rpm),
            ("tpm", tenant.tpm),
            ("max_concurrency", tenant.max_concurrency),
        )
    )
    return f"{tenant.name:<24} weight={tenant.weight:g} {limits}"


def _key_line(key: ApiKey) -> str:
    """One line describing ``key``."""
    state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M:%S}Z" if key.revoked_at else "active"
    return f"{key.prefix}  {key.tenant:<24} created {key.created_at:%Y-%m-%d %H:%M:%S}Z  {state}"


@tenants_app.command("create")
def create(
    name: TenantArg,
    weight: WeightOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
) -> None:
    """Add a tenant (no limits unless given; weight 1)."""
    flags = _limits(weight=weight, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
    typer.echo(_line(_accounts().create_tenant(name, **flags)))


@tenants_app.command("update")
def update_(
    name: TenantArg,
    weight: WeightOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
) -> None:
    """Change a tenant's weight or limits (only the flags given)."""
    changes = _limits(weight=weight, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
    if not changes:
        raise InvalidRequest("Nothing to change: give --weight, --rpm, --tpm or --max-concurrency.")
    typer.echo(_line(_accounts().update_tenant(name, **changes)))


@tenants_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Every tenant with its weight and limits."""
    tenants = _accounts().tenants()
    if as_json:
        typer.echo(json.dumps([t.to_dict() for t in tenants], indent=2))
        return
    if not tenants:
        typer.echo("no tenants; add one with `loraplex tenants create NAME`", err=True)
    for tenant in tenants:
        typer.echo(_line(tenant))


@tenants_app.command("show")
def show(name: TenantArg, as_json: JsonOpt = False) -> None:
    """A tenant's weight, limits and keys."""
    accounts = _accounts()
    tenant, keys = accounts.tenant(name), accounts.keys(name)
    if as_json:
        typer.echo(json.dumps({**tenant.to_dict(), "keys": [k.to_dict() for k in keys]}, indent=2))
        return
    typer.echo(_line(tenant))
    typer.echo(f"created {tenant.created_at:%Y-%m-%d %H:%M:%S}Z")
    typer.echo("keys:" if keys else "keys: none; add one with `loraplex keys create NAME`")
    for key in keys:
        typer.echo(f"  {_key_line(key)}")


@tenants_app.command("delete")
def delete(name: TenantArg) -> None:
    """Delete a tenant; its keys stop working at once (its usage is kept)."""
    _accounts().delete_tenant(name)
    typer.echo(f"deleted tenant {name} and its keys")


@keys_app.command("create")
def create_key(tenant: TenantArg) -> None:
    """Create a key for a tenant and print it on stdout, once (only its hash is stored)."""
    record, key = _accounts().create_key(tenant)
    typer.echo(
        f"created key {record.prefix} (id {record.key_id}) for tenant {tenant}; "
        "this is the only time it is shown:",
        err=True,
    )
    typer.echo(key)


@keys_app.command("list")
def list_keys(tenant: TenantArg, as_json: JsonOpt = False) -> None:
    """A tenant's keys (their ids, never the keys), revoked ones included."""
    keys = _accounts().keys(tenant)
    if as_json:
        typer.echo(json.dumps([k.to_dict() for k in keys], indent=2))
        return
    if not keys:
        typer.echo(f"tenant {tenant} has no keys; add one with `loraplex keys create`", err=True)
    for key in keys:
        typer.echo(_key_line(key))


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="Key id, or its prefix lpx-KEY_ID.")],
) -> None:
    """Revoke a key: every server refuses it from its next check."""
    key = _accounts().revoke_key(key_id)
    typer.echo(f"revoked {key.prefix} of tenant {key.tenant}")


def usage_command(
    since: Annotated[
        str | None, typer.Option(help="From this time: ISO 8601 (UTC if no zone) or -1h, -7d.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to this time (excluded), same forms.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests and tokens per tenant and adapter version, summed over whole minutes."""
    from loraplex.registry.accounts import parse_time

    rows = _accounts().usage(
        parse_time(since) if since else None,
        parse_time(until) if until else None,
        tenant=tenant,
    )
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no usage recorded in that window", err=True)
        return
    typer.echo(f"{'tenant':<24} {'adapter':<32} {'requests':>10} {'prompt':>12} {'completion':>12}")
    for r in rows:
        typer.echo(
            f"{r.tenant:<24} {r.adapter:<32} {r.requests:>10} {r.prompt_tokens:>12} "
            f"{r.completion_tokens:>12}"
        )
