"""``loraplex serve``: one flag per setting, bind the port, then load the engine and serve.

The flags are generated from ``Settings``' fields, so a new setting is a flag at once. The
listening socket is bound before the engine loads (a minute on CPU): a taken port fails at
once, and ``--port 0`` gets a free port that is printed as
``loraplex listening on http://HOST:PORT`` before loading starts.

SIGTERM and Ctrl-C drain (``drain.Lifecycle``) and exit 0; a second Ctrl-C exits at once. After
an engine death the process exits 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from loraplex.config import Settings, load_settings
from loraplex.engine.memory import check_memory
from loraplex.errors import LoraplexError

if TYPE_CHECKING:
    import uvicorn

    from loraplex.server.drain import Lifecycle

EXTRA_FLAG_NAMES = {"base_model": ["--base"]}
"""Short names kept beside the generated ``--field-name`` flags."""


class PortUnavailable(LoraplexError):
    """The address to listen on cannot be bound."""


def flag_names(field: str) -> list[str]:
    """``max_loras`` -> ``["--max-loras"]`` (+ any short name)."""
    return [f"--{field.replace('_', '-')}", *EXTRA_FLAG_NAMES.get(field, [])]


def flag_type(annotation: Any) -> type:
    """The click-friendly type of a field: ``X | None`` -> X, a ``Literal`` -> str."""
    if get_origin(annotation) is Literal:
        return str
    options = [a for a in get_args(annotation) if a is not type(None)]
    return flag_type(options[0]) if options else annotation


def flag_help(field: FieldInfo) -> str:
    """The field's description, its choices and its default."""
    text = field.description or ""
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if choices:
        text += f" ({'|'.join(choices)})"
    if field.default_factory is None and field.default is not None:
        text += f" (default: {field.default})"
    return text


def serve_parameters() -> list[inspect.Parameter]:
    """One keyword parameter (a typer option defaulting to None = unset) per setting."""
    return [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                flag_type(field.annotation) | None,
                typer.Option(*flag_names(name), help=flag_help(field), show_default=False),
            ],
        )
        for name, field in Settings.model_fields.items()
    ]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), or ``PortUnavailable``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"cannot listen on {host}:{port}: {exc.strerror}. Stop what uses it, or choose "
            "another --port (--port 0 picks a free one)."
        ) from None
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        )
    except (OSError, ValueError):
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse auth off on an address others can reach, unless the operator insists."""
    if (
        settings.auth == "off"
        and not settings.allow_insecure_no_auth
        and not is_loopback(settings.host)
    ):
        raise LoraplexError(
            f"Refusing to serve {settings.host} with auth off: anyone who reaches it could use "
            "every tenant's adapters. Turn auth on (create keys with `loraplex keys create`), "
            "bind 127.0.0.1, or pass --allow-insecure-no-auth."
        )


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def draining_server(config: uvicorn.Config, lifecycle: Lifecycle) -> uvicorn.Server:
    """A uvicorn server whose first stop signal drains (``lifecycle``) instead of closing."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            lifecycle.stop_serving = self.stop
            await super().serve(sockets)

        def stop(self) -> None:
            self.should_exit = True

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not uvicorn's handler: it would close the port at once and re-raise the signal
            # at exit (a nonzero status after a clean drain).
            if self.started and not lifecycle.draining and self.loop is not None:
                logging.getLogger("loraplex.server").info(
                    "%s received: draining", signal.Signals(sig).name
                )
                self.loop.call_soon_threadsafe(lifecycle.begin_drain)
            elif self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer(config)


RAY_PARAMETERS = [
    inspect.Parameter(
        "ray",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                "--ray",
                help="Serve as Ray Serve replicas with adapter-affinity routing "
                "(needs loraplex\\[ray]; docs/ray.md).",
            ),
        ],
    ),
    inspect.Parameter(
        "replicas",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            int | None, typer.Option("--replicas", min=1, help="With --ray (default 1).")
        ],
    ),
    inspect.Parameter(
        "autoscaling_config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--autoscaling-config",
                help="With --ray, instead of --replicas: Ray Serve's autoscaling_config "
                'as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4}\' (docs/ray.md).',
            ),
        ],
    ),
    inspect.Parameter(
        "address",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--address",
                help="With --ray: the Ray cluster (ray://HOST:PORT or auto); "
                "default: start a local one.",
            ),
        ],
    ),
    inspect.Parameter(
        "affinity",
        inspect.Parameter.KEYWORD_ONLY,
        default=True,
        annotation=Annotated[
            bool,
            typer.Option(
                "--affinity/--no-affinity",
                help="With --ray: route adapter requests to replicas holding the adapter "
                "(--no-affinity: spread all requests, for comparison).",
            ),
        ],
    ),
    inspect.Parameter(
        "adapters_per_replica",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            int | None,
            typer.Option(
                "--adapters-per-replica",
                min=1,
                help="With --ray: adapter versions one replica keeps loaded "
                "(default: --max-cpu-loras).",
            ),
        ],
    ),
]
"""``serve``'s flags that are not settings: where and how to serve on Ray."""


def serve_command(
    *,
    ray: bool = False,
    replicas: int | None = None,
    autoscaling_config: str | None = None,
    address: str | None = None,
    affinity: bool = True,
    adapters_per_replica: int | None = None,
    **flags: Any,
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    settings = load_settings(**{k: v for k, v in flags.items() if v is not None})
    check_exposure(settings)
    if ray:
        serve_ray(settings, replicas, autoscaling_config, address, adapters_per_replica, affinity)
        return
    check_memory(settings)
    sock = bind_socket(settings.host, settings.port)
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    typer.echo(f"loraplex listening on {url_of(sock)} (loading the engine)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("loraplex").setLevel(settings.log_level.upper())
    log = logging.getLogger("loraplex.server")
    if settings.auth == "off":
        log.warning("authentication is OFF: every caller may use every adapter")
    else:
        log.info("authentication is on: requests need 'Authorization: Bearer KEY'")
    import uvicorn

    from loraplex.server.app import create_app

    app = create_app(settings)
    # h11, not httptools: h11 stops buffering a request head past the limit (httptools has none)
    config = uvicorn.Config(
        app,
        log_level="info",
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=5,
    )
    draining_server(config, app.state.lifecycle).run(sockets=[sock])
    if app.state.lifecycle.exit_code:
        raise typer.Exit(app.state.lifecycle.exit_code)


def serve_ray(
    settings: Settings,
    replicas: int | None,
    autoscaling: str | None,
    address: str | None,
    adapters_per_replica: int | None,
    affinity: bool = True,
) -> None:
    """``serve --ray``: Ray Serve replicas behind an adapter-affinity router."""
    try:
        from loraplex.server.ray_serve import autoscaling_config, serve_on_ray
    except ImportError as exc:
        raise LoraplexError(
            f"--ray needs Ray Serve ({exc}): pip install 'loraplex[ray]'."
        ) from None
    if replicas is not None and autoscaling is not None:
        raise LoraplexError(
            "--replicas and --autoscaling-config exclude each other: "
            "set min_replicas and max_replicas in the config."
        )
    scaling = autoscaling_config(autoscaling) if autoscaling is not None else replicas or 1
    if settings.port == 0:  # Ray Serve's proxy binds the port itself: pick a free one
        with bind_socket(settings.host, 0) as sock:
            settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    per_replica = adapters_per_replica or settings.max_cpu_loras
    serve_on_ray(settings, scaling, address, per_replica, affinity)


_PARAMETERS = [*RAY_PARAMETERS, *serve_parameters()]
serve_command.__signature__ = inspect.Signature(_PARAMETERS)  # type: ignore[attr-defined]
serve_command.__annotations__ = {p.name: p.annotation for p in _PARAMETERS}
