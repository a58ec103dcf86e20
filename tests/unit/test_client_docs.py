"""Every Python example in ``docs/client.md`` runs as written against the stub server.

The examples name ``http://127.0.0.1:8000``; here that address is swapped for the stub's, whose
models answer by name (``missing`` is a 404, any other name succeeds). An example that calls
something that does not exist, or reads a field the client does not have, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from stub_server import StubServer


DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index: int, stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = EXAMPLES[index].replace("http://127.0.0.1:8000", stub.url)
    exec(compile(code, f"{DOC.name} example {index + 1}", "exec"), {"__name__": "example"})
    assert stub.app.state.calls, "the example sent no completion request"
    assert capsys.readouterr().out.strip(), "the example printed nothing"
