"""The quickstart (examples/hello.py), the CLI (python -m ferroxy / ferroxy) and the
programmatic helpers a new user meets first."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import (
    HOST,
    REPO_ROOT,
    CliProxy,
    fixed_upstream_app,
    free_port,
    port_accepts,
    run_cli,
    wait_for_port,
    wait_until,
    write_app,
)


def test_public_names_importable() -> None:
    import ferroxy
    from ferroxy import Headers, Peer, Proxy, ProxyError, Response, Session  # noqa: F401

    assert isinstance(ferroxy._core.__version__, str) and ferroxy._core.__version__


def test_hello_example_quickstart() -> None:
    """The README quickstart: run examples/hello.py against the demo upstream on 8081."""
    hello = REPO_ROOT / "examples" / "hello.py"
    assert hello.is_file(), "examples/hello.py (the quickstart) is missing"
    if port_accepts(8081):
        pytest.skip("port 8081 is in use on this machine; hello.py hardcodes it")
    with run_cli(f"{hello}:App", "--demo-upstream", f"{HOST}:8081", cwd=REPO_ROOT) as cli:
        wait_for_port(8081, timeout=10, proc=cli.proc, describe=cli.describe)
        with httpx.Client(base_url=cli.url, timeout=10) as client:
            r = client.get("/hello?x=1")
            assert r.status_code == 200, r.text
            assert r.headers.get("x-served-by") == "ferroxy"
            echo = r.json()
            assert echo["path"] == "/hello"
            assert echo["query"] == "x=1"

            blocked = client.get("/blocked")
            assert blocked.status_code == 403
            assert blocked.content == b"blocked\n"

        banner = f"ferroxy listening on http://{HOST}:{cli.port}"
        assert wait_until(lambda: banner in cli.stderr(), timeout=5), (
            f"start-up line {banner!r} not printed on stderr\n{cli.describe()}"
        )


def test_cli_file_spec_serves_requests(tmp_path: Path, ferroxy_upstream) -> None:
    spec = write_app(
        tmp_path,
        f"""
        from ferroxy import Proxy

        class App(Proxy):
            upstream = {ferroxy_upstream.addr!r}

            def response_filter(self, session, upstream_response, ctx):
                upstream_response.headers["x-app"] = "file-spec"
        """,
    )
    with run_cli(spec, "--threads", "2") as cli:
        r = httpx.get(cli.url + "/via-file", timeout=10)
        assert r.status_code == 200
        assert r.headers.get("x-app") == "file-spec"
        assert r.json()["path"] == "/via-file"
        banner = f"ferroxy listening on http://{HOST}:{cli.port}"
        assert wait_until(lambda: banner in cli.stderr(), timeout=5), cli.describe()


def test_cli_module_attr_spec(tmp_path: Path, ferroxy_upstream) -> None:
    """``module:Attr`` resolves a module in the current directory (python -m ferroxy)."""
    write_app(
        tmp_path,
        f"""
        from ferroxy import Proxy

        class MyApp(Proxy):
            upstream = {ferroxy_upstream.addr!r}

            def response_filter(self, session, upstream_response, ctx):
                upstream_response.headers["x-app"] = "module-spec"
        """,
        name="my_ferroxy_app.py",
    )
    with run_cli("my_ferroxy_app:MyApp", cwd=tmp_path) as cli:
        r = httpx.get(cli.url + "/via-module", timeout=10)
        assert r.status_code == 200
        assert r.headers.get("x-app") == "module-spec"


def test_console_script(tmp_path: Path, ferroxy_upstream) -> None:
    """The ``ferroxy`` console script takes the same arguments as ``python -m ferroxy``,
    including a ``module:Attr`` spec for a module in the current directory."""
    exe = shutil.which("ferroxy") or str(Path(sys.executable).parent / "ferroxy")
    if not Path(exe).exists():
        pytest.fail("the `ferroxy` console script is not installed")
    write_app(
        tmp_path,
        f"""
        from ferroxy import Proxy

        class App(Proxy):
            upstream = {ferroxy_upstream.addr!r}

            def response_filter(self, session, upstream_response, ctx):
                upstream_response.headers["x-app"] = "console-script"
        """,
        name="console_app.py",
    )
    with run_cli("console_app:App", "--no-access-log", argv0=[exe], cwd=tmp_path) as cli:
        r = httpx.get(cli.url + "/x", timeout=10)
        assert r.status_code == 200
        assert r.headers.get("x-app") == "console-script"


def _stop(cli: CliProxy) -> None:
    """SIGTERM, as a supervisor stops it: graceful, and the access log is written out."""
    cli.proc.send_signal(signal.SIGTERM)
    assert cli.proc.wait(timeout=15) == 0, cli.describe()


def test_cli_access_log_on_stdout_by_default_and_off(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with run_cli(spec) as cli:
        assert httpx.get(cli.url + "/access-log-marker-1", timeout=10).status_code == 200
        assert wait_until(
            lambda: '"GET /access-log-marker-1 HTTP/1.1" 200' in cli.stdout(), timeout=3
        ), f"no access log line for the request on the CLI's stdout\n{cli.describe()}"
        # Application logs stay on stderr, the access log on stdout.
        assert "/access-log-marker-1" not in cli.stderr()

    for off in (["--no-access-log"], ["--access-log", "off"]):
        with run_cli(spec, "--log-level", "debug", *off) as cli:
            assert httpx.get(cli.url + "/access-log-marker-2", timeout=10).status_code == 200
            _stop(cli)
            assert "/access-log-marker-2" not in cli.stdout() + cli.stderr(), (
                f"{off} still printed an access line\n{cli.describe()}"
            )


def test_cli_access_log_file_and_format(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    log = tmp_path / "access.log"
    with run_cli(spec, "--access-log", str(log), "--access-log-format", "json") as cli:
        assert httpx.get(cli.url + "/json-cli?x=1", timeout=10).status_code == 200
        assert wait_until(lambda: log.exists() and log.read_text(), timeout=3), cli.describe()
        [record] = [json.loads(line) for line in log.read_text().splitlines()]
        assert (record["path"], record["query"], record["status"]) == ("/json-cli", "x=1", 200)
        assert record["upstream"] == ferroxy_upstream.addr
        assert "/json-cli" not in cli.stdout()


def test_cli_bad_access_log_options_exit_1(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    unopenable = str(tmp_path / "no-such-dir" / "access.log")
    for args, named in [
        (["--access-log-format", "{client} {nope}"], "access_log_format"),
        (["--access-log", unopenable], unopenable),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "ferroxy", spec, "--listen", f"{HOST}:{free_port()}", *args],
            capture_output=True,
            timeout=30,
        )
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, f"{args}: exit {proc.returncode}\n{err}"
        assert named in err, f"the error should name {named!r}; stderr:\n{err}"


def test_cli_sigusr1_reopens_the_access_log(tmp_path: Path, ferroxy_upstream) -> None:
    """logrotate's way: rename the file, send SIGUSR1; new lines go to a new file."""
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    log = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    with run_cli(spec, "--access-log", str(log)) as cli:
        assert httpx.get(cli.url + "/before-rotation", timeout=10).status_code == 200
        assert wait_until(lambda: "/before-rotation" in log.read_text(), timeout=3)
        log.rename(rotated)
        cli.proc.send_signal(signal.SIGUSR1)
        assert wait_until(log.exists, timeout=5), f"no new file after SIGUSR1\n{cli.describe()}"
        assert httpx.get(cli.url + "/after-rotation", timeout=10).status_code == 200
        assert wait_until(lambda: "/after-rotation" in log.read_text(), timeout=3)
        _stop(cli)
    assert "/after-rotation" not in rotated.read_text()
    assert "/before-rotation" not in log.read_text()


@pytest.mark.parametrize(
    "spec",
    ["does_not_exist_anywhere.py:App", "no_such_module_ferroxy_xyz:App", "{app}:Missing"],
)
def test_cli_bad_app_spec_fails_fast(tmp_path: Path, spec: str, ferroxy_upstream) -> None:
    app = fixed_upstream_app(tmp_path, ferroxy_upstream.addr).rsplit(":", 1)[0]
    spec = spec.format(app=app)
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "ferroxy", spec, "--listen", f"{HOST}:{port}"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0, "a bad app spec must make the CLI exit non-zero"
    err = proc.stderr.decode(errors="replace")
    name = spec.rsplit(":", 1)[1] if spec.endswith(":Missing") else spec.split(":")[0]
    assert name in err, f"the error should name {name!r}; stderr was:\n{err}"


def test_cli_port_in_use_fails_with_address(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(8)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "ferroxy", spec, "--listen", f"{HOST}:{port}"],
            capture_output=True,
            timeout=30,
        )
    assert proc.returncode != 0, "binding a busy port must make the CLI exit non-zero"
    err = proc.stderr.decode(errors="replace")
    assert f"{HOST}:{port}" in err, f"the error should name the address; stderr:\n{err}"


def test_testing_helpers_outside_pytest() -> None:
    """``ferroxy.testing.start_upstream`` / ``start_proxy`` work without the fixtures."""
    from ferroxy import Proxy
    from ferroxy.testing import start_proxy, start_upstream

    upstream = start_upstream()
    try:

        class App(Proxy):
            pass

        App.upstream = upstream.addr
        proxy = start_proxy(App)
        try:
            assert proxy.url == f"http://{proxy.addr}"
            assert proxy.addr.endswith(f":{proxy.port}")
            r = httpx.get(proxy.url + "/helpers", timeout=10)
            assert r.status_code == 200
            assert r.json()["path"] == "/helpers"
            assert upstream.requests == 1
        finally:
            proxy.stop()
        assert wait_until(lambda: not port_accepts(proxy.port), timeout=5), (
            "the proxy port still accepts connections after stop()"
        )
    finally:
        upstream.stop()


def test_fixture_handles(ferroxy_upstream, ferroxy_proxy) -> None:
    from ferroxy import Proxy

    assert ferroxy_upstream.url == f"http://{ferroxy_upstream.addr}"
    assert ferroxy_upstream.addr == f"{HOST}:{ferroxy_upstream.port}"

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    assert proxy.url == f"http://{proxy.addr}"
    assert proxy.addr == f"{HOST}:{proxy.port}"
    r = httpx.get(proxy.url + "/fixture", timeout=10)
    assert r.status_code == 200
    assert ferroxy_upstream.requests == 1
    assert ferroxy_upstream.connections == 1


def test_cli_listens_on_every_listen_given(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    second = free_port()
    with run_cli(spec, "--listen", f"{HOST}:{second}", "--no-access-log") as cli:
        wait_for_port(second, proc=cli.proc, describe=cli.describe)
        for port in (cli.port, second):
            r = httpx.get(f"http://{HOST}:{port}/on-{port}", timeout=10)
            assert r.status_code == 200 and r.json()["path"] == f"/on-{port}"
        for port in (cli.port, second):
            assert f"ferroxy listening on http://{HOST}:{port}" in cli.stderr(), cli.describe()


def _tcp_echo_round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def _http_and_tcp_apps(tmp_path: Path, http_upstream: str, tcp_upstream: str) -> str:
    """app.py with an HTTP ``App`` and a TCP ``Tcp``; returns the file's path."""
    write_app(
        tmp_path,
        f"""
        from ferroxy import Proxy, TcpProxy

        class App(Proxy):
            upstream = {http_upstream!r}

        class Tcp(TcpProxy):
            upstream = {tcp_upstream!r}
        """,
    )
    return str(tmp_path / "app.py")


def test_cli_two_targets_serve_http_and_tcp_each_on_its_listen(
    tmp_path: Path, ferroxy_upstream, ferroxy_tcp_upstream
) -> None:
    # App's upstream is the demo upstream the CLI starts (--demo-upstream).
    demo = f"{HOST}:{free_port()}"
    app = _http_and_tcp_apps(tmp_path, demo, ferroxy_tcp_upstream.addr)
    tcp_port = free_port()
    # run_cli puts `--listen HOST:PORT` after the first TARGET: App's; Tcp's follows.
    with run_cli(
        f"{app}:App", f"{app}:Tcp", "--listen", f"{HOST}:{tcp_port}", "--demo-upstream", demo
    ) as cli:
        wait_for_port(tcp_port, proc=cli.proc, describe=cli.describe)
        r = httpx.get(cli.url + "/from-cli", timeout=10)
        assert r.status_code == 200 and r.json()["path"] == "/from-cli"
        payload = bytes(range(256)) * 1000
        assert _tcp_echo_round_trip(tcp_port, payload) == payload
        for banner in (f"http://{HOST}:{cli.port}", f"tcp://{HOST}:{tcp_port}"):
            assert wait_until(lambda b=banner: b in cli.stderr(), timeout=5), cli.describe()
        # Graceful stop: both services end, exit status 0.
        _stop(cli)
        assert not port_accepts(cli.port) and not port_accepts(tcp_port)


def test_cli_one_listen_per_target_or_a_usage_error(
    tmp_path: Path, ferroxy_upstream, ferroxy_tcp_upstream
) -> None:
    app = _http_and_tcp_apps(tmp_path, ferroxy_upstream.addr, ferroxy_tcp_upstream.addr)
    proc = subprocess.run(
        [sys.executable, "-m", "ferroxy", f"{app}:App", f"{app}:Tcp", "--listen", f"{HOST}:0"],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc
    err = proc.stderr.decode(errors="replace")
    assert "2 TARGETs need one --listen each" in err and "got 1 --listen" in err, err


def test_cli_one_tcp_target(tmp_path: Path, ferroxy_upstream, ferroxy_tcp_upstream) -> None:
    app = _http_and_tcp_apps(tmp_path, ferroxy_upstream.addr, ferroxy_tcp_upstream.addr)
    with run_cli(f"{app}:Tcp") as cli:
        assert _tcp_echo_round_trip(cli.port, b"one tcp target") == b"one tcp target"
        _stop(cli)


def test_the_tcp_example_listens_for_http_and_proxies_tcp(
    ferroxy_upstream, ferroxy_tcp_upstream
) -> None:
    """examples/tcp.py as its docstring runs it, with the TCP upstream from REDIS."""
    example = REPO_ROOT / "examples" / "tcp.py"
    tcp_port = free_port()
    with run_cli(
        f"{example}:App",
        f"{example}:Redis",
        "--listen",
        f"{HOST}:{tcp_port}",
        env={"REDIS": ferroxy_tcp_upstream.addr},
    ) as cli:
        wait_for_port(tcp_port, proc=cli.proc, describe=cli.describe)
        # Echoed: the hook sent it to REDIS's address, the echo upstream.
        assert _tcp_echo_round_trip(tcp_port, b"PING\r\n") == b"PING\r\n"
