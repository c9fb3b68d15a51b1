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
