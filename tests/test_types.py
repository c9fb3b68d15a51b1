"""The examples type-check under ``mypy --strict`` (the package ships typing info)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytest.importorskip("mypy", reason="mypy is not installed")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(cache: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *targets],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_examples_pass_mypy_strict(mypy_cache: Path) -> None:
    examples = REPO_ROOT / "examples"
    assert any(examples.glob("*.py")), "no examples to type-check"
    out = _mypy(mypy_cache, "examples/")
    assert out.returncode == 0, f"mypy --strict examples/ failed:\n{out.stdout}\n{out.stderr}"


def test_mypy_flags_a_hook_returning_the_wrong_type(mypy_cache: Path, tmp_path: Path) -> None:
    """A user's typed app that returns an int from request_filter is caught by mypy."""
    bad = tmp_path / "bad_app.py"
    bad.write_text(
        textwrap.dedent(
            """
            from typing import Any

            from ferroxy import Proxy, Session


            class App(Proxy):
                upstream = "127.0.0.1:8081"

                def request_filter(self, session: Session, ctx: Any) -> int:
                    return 42
            """
        )
    )
    out = _mypy(mypy_cache, str(bad))
    assert out.returncode != 0 and "request_filter" in out.stdout, (
        f"mypy did not flag request_filter returning int:\n{out.stdout}\n{out.stderr}"
    )


def _mypy_snippet(cache: Path, tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(source))
    return _mypy(cache, str(path))


_TYPED_CTX_APP = """
    import dataclasses

    from ferroxy import Peer, Proxy, ResponseHeader, Session


    @dataclasses.dataclass
    class MyCtx:
        hits: int = 0


    class App(Proxy[MyCtx]):
        def new_ctx(self) -> MyCtx:
            return MyCtx()

        def upstream_peer(self, session: Session, ctx: MyCtx) -> Peer:
            ctx.hits += 1
            return Peer("127.0.0.1:8081")

        def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: MyCtx
        ) -> None:
            upstream_response.headers["x-hits"] = str(ctx.hits)
    """


def test_a_typed_ctx_checks_end_to_end(mypy_cache: Path, tmp_path: Path) -> None:
    out = _mypy_snippet(
        mypy_cache,
        tmp_path,
        _TYPED_CTX_APP
        + """
    app = App()
    app.upstream = "127.0.0.1:8082"
    """,
    )
    assert out.returncode == 0, f"a correct Proxy[MyCtx] app fails mypy:\n{out.stdout}"


def test_mypy_flags_a_wrong_ctx(mypy_cache: Path, tmp_path: Path) -> None:
    out = _mypy_snippet(
        mypy_cache,
        tmp_path,
        _TYPED_CTX_APP
        + """
    class WrongNewCtx(Proxy[MyCtx]):
        def new_ctx(self) -> int:
            return 1


    class WrongHookCtx(Proxy[MyCtx]):
        def request_filter(self, session: Session, ctx: str) -> None:
            return None


    class UsesCtxWrongly(App):
        def logging(self, session: Session, error: object, ctx: MyCtx) -> None:
            ctx.misses += 1
    """,
    )
    report = out.stdout
    assert 'Return type "int" of "new_ctx" incompatible' in report, report
    assert 'Argument 2 of "request_filter" is incompatible' in report, report
    assert '"MyCtx" has no attribute "misses"' in report, report


def test_mypy_checks_server_options(mypy_cache: Path, tmp_path: Path) -> None:
    out = _mypy_snippet(
        mypy_cache,
        tmp_path,
        """
        import ferroxy
        from ferroxy import Proxy
        from ferroxy.testing import start_proxy


        class App(Proxy):
            upstream = "127.0.0.1:8081"


        ferroxy.run(App, listen="127.0.0.1:8080", grace_period=1.5, access_log=False)
        start_proxy(App, threads="four")
        ferroxy.ProxyServer(App, no_such_option=1)
        """,
    )
    report = out.stdout
    assert out.returncode != 0
    assert 'Argument "threads" to "start_proxy" has incompatible type "str"' in report, report
    assert 'Unexpected keyword argument "no_such_option"' in report, report
    assert report.count("error:") == 2, f"the correct run() call was flagged:\n{report}"


def test_headers_type_as_a_mutable_mapping(mypy_cache: Path, tmp_path: Path) -> None:
    out = _mypy_snippet(
        mypy_cache,
        tmp_path,
        """
        from collections.abc import MutableMapping

        from ferroxy import Headers, Response

        h: MutableMapping[str, str] = Headers({"a": "1"})
        raw: bytes | None = Headers([("a", b"\\xe9")]).get_bytes("a")
        Response(200, headers=Headers(), body=None)
        """,
    )
    assert out.returncode == 0, out.stdout
