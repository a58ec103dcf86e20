"""Shared fixtures of the integration tests: the real bundled model, demo adapters, and one
running ``loraplex serve`` (real vLLM engine, fp32 so that batched == solo) per session.

Fixtures:
- ``base_model_dir``: the prepared bundled model folder.
- ``demo_adapters``: {"pirate": path, "shout": path}, trained by ``loraplex.train.demo``.
- ``adapters_dir``: a folder holding the demo adapters plus ``random1``/``random2``.
- ``server``: a running server over ``adapters_dir``; ``.url``, ``.base``, ``.admin_key``,
  ``.startup_seconds``, ``.log_tail()``.
- ``make_random_adapter(path, seed, rank=8)``: a PEFT adapter with random non-zero weights.
- ``s3_endpoint``: a ``moto_server`` S3 endpoint per module, dummy AWS credentials set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraplex.basemodel import prepare
from loraplex.config import Settings
from loraplex.testing.launcher import (
    RunningServer,
    loraplex_server,
    reserved_port,
    running_server,
    server_env,
)

BASE_NAME = "smollm2-135m"
DEMO_NAMES = ("pirate", "shout")
ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session")
def loraplex_home() -> Path:
    """The home shared by the test session: the prepared model and trained demos live here."""
    return Settings().home


@pytest.fixture(scope="session")
def base_model_dir(loraplex_home: Path) -> Path:
    return prepare(loraplex_home / "models").path


@pytest.fixture(scope="session")
def demo_adapters(loraplex_home: Path, base_model_dir: Path) -> dict[str, Path]:
    out = loraplex_home / "demo-adapters"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "loraplex.train.demo",
            "--out",
            str(out),
            "--base",
            str(base_model_dir),
        ],
        check=True,
    )
    return {name: out / name for name in DEMO_NAMES}


@pytest.fixture(scope="session")
def make_random_adapter(base_model_dir: Path) -> Callable[..., Path]:
    from loraplex.testing.random_adapters import make_random_adapters

    def make(path: Path, seed: int, rank: int = 8) -> Path:
        (made,) = make_random_adapters(base_model_dir, [path], seed=seed, rank=rank)
        return made

    return make


@pytest.fixture(scope="session")
def adapters_dir(
    tmp_path_factory: pytest.TempPathFactory,
    demo_adapters: dict[str, Path],
    make_random_adapter: Callable[..., Path],
) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, path in demo_adapters.items():
        shutil.copytree(path, root / name)
    make_random_adapter(root / "random1", seed=1)
    make_random_adapter(root / "random2", seed=2)
    return root


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, adapters_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("server-home")
    env = server_env(
        home,
        base_model_dir,
        adapters_dir=adapters_dir,
        admin_key=ADMIN_KEY,
        served_model_name=BASE_NAME,
        enforce_eager=False,  # the compiled model, as `loraplex serve` runs it
    )
    with loraplex_server(home / "server.log", env=env) as running:
        running.base = BASE_NAME  # type: ignore[attr-defined]
        running.admin_key = ADMIN_KEY  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process for this module, with dummy credentials in the environment."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    assert moto, "moto_server not found: pip install 'moto[server]'"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        with reserved_port() as port:
            command = [moto, "-H", "127.0.0.1", "-p", str(port)]
            url = f"http://127.0.0.1:{port}"
            with running_server(command, log, url=url, ready_path="/", timeout=60):
                yield url
