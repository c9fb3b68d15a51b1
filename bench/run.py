"""Side-by-side proxy benchmark: ferroxy against nginx, HAProxy and mitmproxy, same machine,
same run, pinned (load generator on CPU 0; upstream and proxy under test on CPU 1).

    python bench/run.py                 # full run: 3 interleaved rounds of 10 s
    python bench/run.py --smoke         # one short round of ferroxy's pure Rust path
    python bench/run.py --baseline OLD/bin/python --baseline-label COMMIT
                                        # A/B: every ferroxy mode also on an older build

Writes bench/RESULTS.md (unless --no-write). Needs nginx, haproxy, wrk and h2load
(`apt-get install -y nginx-light haproxy wrk nghttp2-client`) and, for the mitmproxy row,
`pip install mitmproxy`. Every process it starts is stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_CPU, SERVER_CPU = "0", "1"


@dataclasses.dataclass(frozen=True)
class Mode:
    """A ferroxy row: an app from bench/apps.py, with its access log or without."""

    app: str
    access_log: bool = False
    #: The module of bench/ that defines the app. One other than apps.py is run on the current
    #: build only (a baseline from before issue 8 has no LoadBalancer, from before issue 9 no
    #: filters), back to back with the static-peer row it is compared with.
    module: str = "apps"

    @property
    def beside_static(self) -> bool:
        """Compared with the static-peer row, and run on the current build only."""
        return self.module != "apps"

    @property
    def spec(self) -> str:
        return f"bench/{self.module}.py:{self.app}"


ACCESS_LOG_ROW, NO_ACCESS_LOG_ROW = "ferroxy-1 rust path", "ferroxy-1 rust path, no access log"
FERROXY_MODES = {
    # The default configuration (access log on) beside the same app with it off: the
    # access log's cost, measured in one run.
    ACCESS_LOG_ROW: Mode("RustPath", access_log=True),
    NO_ACCESS_LOG_ROW: Mode("RustPath"),
    "ferroxy-2 sync hook": Mode("SyncHook"),
    "ferroxy-3 async hook": Mode("AsyncHook"),
    "ferroxy-4 all hooks": Mode("AllHooks"),
    # Beside NO_ACCESS_LOG_ROW, the same app with a static Peer: what picking costs.
    "ferroxy-5 pool of 2, round robin": Mode("Pool2", module="lb_apps"),
    "ferroxy-6 pool of 100, round robin": Mode("Pool100", module="lb_apps"),
    "ferroxy-7 pool of 2, consistent hash": Mode("Consistent2", module="lb_apps"),
    # Beside NO_ACCESS_LOG_ROW too: what 20 filters and 100 routes cost (target: 0.90x).
    "ferroxy-8 20 filters plus 100 routes": Mode("FiltersRoutes", module="rules_apps"),
}
#: Listeners of the upstream nginx, the backends of the load-balanced rows.
POOL_SIZE = 100
#: nginx round robin over the same 100 backends: the pool-of-100 row's yardstick.
NGINX_POOL_ROW = "nginx, 100 servers, round robin"
#: The rows behind a TLS listener (HTTP/1.1 and h2 by ALPN, one certificate made at run time),
#: each measured under the TLS loads below; ferroxy's on the current build only.
TLS_ROWS = {
    "nginx": "nginx, TLS",
    "haproxy": "haproxy, TLS",
    "ferroxy": "ferroxy-1 rust path, no access log, TLS",
}
#: The rows that speak cleartext HTTP/2 with prior knowledge (h2c) to the upstream, measured
#: under HTTP/1.1 keep-alive like the plain rows. nginx has none: it proxies HTTP/2 upstream
#: only for gRPC (grpc_pass).
H2_UPSTREAM_ROWS = {
    "haproxy": "haproxy, h2 upstream",
    "ferroxy": "ferroxy-1 rust path, no access log, h2 upstream",
}
BASELINE_SUFFIX = " (baseline)"


# ------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if (os.cpu_count() or 1) > 1 else argv


@dataclasses.dataclass
class Server:
    """A process under test; CPU and memory are read from /proc for it and its children."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    h2_port: int | None = None
    #: "https" for a TLS listener (which offers h2 and http/1.1 by ALPN).
    scheme: str = "http"

    def pids(self) -> list[int]:
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    todo.extend(int(c) for c in children)
        return pids

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / CLK_TCK

    def memory_kib(self, field: str) -> int:
        """A /proc/PID/status memory figure (VmRSS, VmHWM ...) summed over the processes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        return total

    def peak_rss_mib(self) -> float:
        return self.memory_kib("VmHWM") / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Fleet:
    """Starts the servers and stops every one of them, by PID, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []

    def file(self, name: str, suffix: str) -> Path:
        """The workdir file ``suffix`` of the server ``name``."""
        return self.workdir / f"{re.sub(r'[^a-z0-9]+', '-', name)}{suffix}"

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        h2_port: int | None = None,
        env: dict[str, str] | None = None,
        scheme: str = "http",
    ) -> Server:
        log = open(self.file(name, ".log"), "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            pinned(SERVER_CPU, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        server = Server(name, proc, port, h2_port, scheme)
        self.servers.append(server)
        wait_for_port(port)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


# ------------------------------------------------------------------------- the servers


def nginx_conf(workdir: Path, body: str, worker_connections: int = 8192) -> Path:
    conf = workdir / f"nginx-{abs(hash(body))}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {conf}.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    {body}
}}
""")
    return conf


def start_upstream(fleet: Fleet) -> tuple[Server, list[int], int]:
    """The upstream nginx, the ports it listens on (the first is the static peer's; all
    of them are the load-balanced rows' backends), and its cleartext HTTP/2 (h2c, prior
    knowledge) port, the h2-upstream rows' backend."""
    *ports, h2c_port = free_ports(POOL_SIZE + 1)
    listens = "\n        ".join(
        [f"listen 127.0.0.1:{port};" for port in ports] + [f"listen 127.0.0.1:{h2c_port} http2;"]
    )
    conf = nginx_conf(
        fleet.workdir,
        f"""
    server {{
        {listens}
        location / {{ return 200 "hello"; }}
    }}""",
    )
    server = fleet.start("upstream nginx", ["nginx", "-c", str(conf), "-e", "stderr"], ports[0])
    wait_for_port(h2c_port)
    return server, ports, h2c_port


def start_nginx(
    fleet: Fleet, upstreams: list[int], name: str = "nginx", worker_connections: int = 8192
) -> Server:
    """nginx proxying to ``upstreams`` (round robin when there are several). Its keepalive
    cache (idle upstream connections, shared by the servers of an upstream block) holds
    64 per server, as ferroxy's pool keeps them per backend: a smaller one would make
    nginx open a connection for most requests to a large pool."""
    port, h2_port = free_port(), free_port()
    servers = " ".join(f"server 127.0.0.1:{upstream};" for upstream in upstreams)
    location = """
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    conf = nginx_conf(
        fleet.workdir,
        f"""
    upstream up {{ {servers} keepalive {64 * len(upstreams)}; }}
    server {{ listen 127.0.0.1:{port}; {location} }}
    server {{ listen 127.0.0.1:{h2_port} http2; {location} }}""",
        worker_connections,
    )
    return fleet.start(name, ["nginx", "-c", str(conf), "-e", "stderr"], port, h2_port)


def start_nginx_tls(fleet: Fleet, upstream: int, certificate: Certificate) -> Server:
    """nginx as start_nginx's, behind a TLS listener offering h2 and http/1.1 by ALPN (nginx
    1.22 spells it ``listen ... ssl http2``), its TLS settings the defaults but for the
    protocols, TLS 1.2 and 1.3 as ferroxy's."""
    port = free_port()
    conf = nginx_conf(
        fleet.workdir,
        f"""
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certificate.cert};
        ssl_certificate_key {certificate.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
    )
    argv = ["nginx", "-c", str(conf), "-e", "stderr"]
    return fleet.start(TLS_ROWS["nginx"], argv, port, port, scheme="https")


def start_haproxy(
    fleet: Fleet,
    upstream: int,
    name: str = "haproxy",
    bind_options: str = "",
    server_options: str = "",
    scheme: str = "http",
) -> Server:
    """HAProxy in front of ``upstream``; ``bind_options`` and ``server_options`` end its
    frontend's ``bind`` and its backend's ``server`` lines (TLS, h2 to the upstream)."""
    port = free_port()
    conf = fleet.file(name, ".cfg")
    conf.write_text(f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port} {bind_options}
    default_backend be
backend be
    server up 127.0.0.1:{upstream} {server_options}
""")
    # HAProxy detects the h2 preface on a clear HTTP bind (h2c on the same port), and picks
    # h2 by ALPN on a TLS one.
    return fleet.start(name, ["haproxy", "-f", str(conf), "-db"], port, port, scheme=scheme)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """One self-signed ECDSA P-256 certificate for localhost and 127.0.0.1, made at run time
    and served by every TLS row; ``combined`` is both in one file, as HAProxy's ``crt``."""

    cert: Path
    key: Path
    combined: Path

    @classmethod
    def make(cls, workdir: Path) -> Certificate:
        cert, key, combined = (workdir / n for n in ("tls.crt", "tls.key", "tls.pem"))
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-sha256",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        combined.write_bytes(cert.read_bytes() + key.read_bytes())
        return cls(cert, key, combined)


def negotiated(server: Server) -> str:
    """The TLS version and cipher a default OpenSSL client settles with ``server``, and the
    ALPN protocol it picks when offered h2 and http/1.1: what the TLS rows measure."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", server.port), 5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        return (
            f"{tls.version()} {cipher[0] if cipher else '?'}, ALPN {tls.selected_alpn_protocol()}"
        )


def start_mitmproxy(fleet: Fleet, upstream: int) -> Server:
    port = free_port()
    argv = [
        "mitmdump",
        "--mode",
        f"reverse:http://127.0.0.1:{upstream}",
        "--listen-host",
        "127.0.0.1",
        "-p",
        str(port),
        "-q",
    ]
    return fleet.start("mitmproxy", argv, port)


@dataclasses.dataclass
class Ferroxy:
    """A ferroxy installation: an interpreter and what it says about the ferroxy it imports."""

    python: str
    version: str
    module: str
    source: Path | None
    commit: str
    cli_help: str

    @classmethod
    def of(cls, python: str, label: str | None = None) -> Ferroxy:
        """Ask ``python`` which ferroxy it imports, where that was installed from (pip's
        direct_url.json) and, unless ``label`` names it, that checkout's commit."""
        # The servers start in REPO: a relative path must not change meaning on the way.
        python = os.path.abspath(shutil.which(python) or python)
        try:
            probe = subprocess.run(
                [python, "-c", FERROXY_PROBE], capture_output=True, text=True, cwd=REPO
            )
        except OSError as error:
            raise RuntimeError(f"cannot run {python}: {error}") from error
        try:
            info = json.loads(probe.stdout) if probe.returncode == 0 else None
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise RuntimeError(f"{python} cannot import ferroxy:\n{probe.stderr.strip()}")
        url = urllib.parse.urlparse(info["source"])
        source = Path(urllib.parse.unquote(url.path)) if url.scheme == "file" else None
        source = source if source and source.is_dir() else None  # not a wheel file
        commit = label or (git_commit(source) if source else "") or "unknown commit"
        cli_help = subprocess.run(
            [python, "-m", "ferroxy", "--help"], capture_output=True, text=True, cwd=REPO
        ).stdout
        return cls(python, info["version"], info["module"], source, commit, cli_help)

    def has_option(self, option: str) -> bool:
        # Not a bare substring test: "--access-log" is inside "--no-access-log".
        return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", self.cli_help) is not None

    def describe(self) -> str:
        source = f" built from {self.source}" if self.source else ""
        return f"{self.commit} (ferroxy {self.version} at {self.module}{source}; {self.python})"


FERROXY_PROBE = """
import importlib.metadata, json, ferroxy
try:
    direct = importlib.metadata.distribution("ferroxy").read_text("direct_url.json")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree
    direct = None
print(json.dumps({"version": ferroxy.__version__, "module": ferroxy.__file__,
                  "source": json.loads(direct or "{}").get("url", "")}))
"""


def start_ferroxy(
    fleet: Fleet,
    upstreams: list[int],
    name: str,
    mode: Mode,
    ferroxy: Ferroxy,
    threads: int = 1,
    h2c_upstream: int | None = None,
    certificate: Certificate | None = None,
) -> tuple[Server, Path | None]:
    """Start one ferroxy row; also returns the file its access log goes to, if it has one.
    With ``certificate`` its listener serves TLS (``--tls-cert``)."""
    port = free_port()
    argv = [
        ferroxy.python,
        "-m",
        "ferroxy",
        mode.spec,
        "--listen",
        f"127.0.0.1:{port}",
        "--threads",
        str(threads),
    ]
    access_log = None
    if not mode.access_log:
        off = ["--no-access-log"] if ferroxy.has_option("--no-access-log") else []
        argv += [*(off or ["--access-log", "off"]), "--log-level", "warning"]
    elif ferroxy.has_option("--access-log"):
        # Otherwise the default configuration: the access log goes to stdout, and a file
        # keeps it apart from the server's log.
        access_log = fleet.file(name, "-access.log")
        argv += ["--access-log", str(access_log)]
    else:
        # An older ferroxy logs each request through Python logging, at info (the default
        # level), to stderr: the server's log file.
        access_log = fleet.file(name, ".log")
    env = {
        "FERROXY_BENCH_UPSTREAM": f"127.0.0.1:{upstreams[0]}",
        "FERROXY_BENCH_POOL": ",".join(f"127.0.0.1:{p}" for p in upstreams),
    }
    if h2c_upstream is not None:
        env["FERROXY_BENCH_H2C_UPSTREAM"] = f"127.0.0.1:{h2c_upstream}"
    scheme = "http"
    if certificate is not None:
        argv += ["--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key)]
        scheme = "https"
    return fleet.start(name, argv, port, port, env=env, scheme=scheme), access_log


# ------------------------------------------------------------------------- load


@dataclasses.dataclass
class Sample:
    rps: float
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_req: float | None = None
    rss_mib: float | None = None
    steal_pct: float | None = None


def cpu_times(cpu: str) -> tuple[int, int]:
    """(all ticks, steal ticks) of one CPU: on a VM, steal is time the host gave to others."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(v) for v in line.split()[1:]]
            return sum(ticks[:8]), ticks[7]
    return 0, 0


def _us(value: str, unit: str) -> float:
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(
    port: int,
    seconds: float,
    connections: int = 50,
    scheme: str = "http",
    new_connections: bool = False,
) -> tuple[float, int, float, float]:
    """requests/s, requests, p50 and p99 in microseconds. With ``new_connections`` each
    request asks for ``Connection: close``: the server closes after answering and wrk opens
    a new connection (a full TLS handshake: wrk resumes no session) for the next."""
    close = ["-H", "Connection: close"] if new_connections else []
    argv = pinned(
        LOAD_CPU,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            *close,
            f"{scheme}://127.0.0.1:{port}/",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))
    p50, p99 = (re.fullmatch(r"([\d.]+)(\w+)", pct[k]) for k in ("50", "99"))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        print(f"    warning: {errors.group(0)}", file=sys.stderr)
    return rps, total, _us(*p50.groups()), _us(*p99.groups())  # type: ignore[union-attr]


def h2load(port: int, seconds: float, scheme: str = "http") -> tuple[float, int]:
    """requests/s and requests; over TLS (``scheme="https"``) h2 is chosen by ALPN."""
    argv = pinned(
        LOAD_CPU,
        [
            "h2load",
            "-c",
            "10",
            "-m",
            "10",
            "-D",
            str(max(1, int(seconds))),
            f"{scheme}://127.0.0.1:{port}/",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    ok = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    if ok == 0:
        raise RuntimeError(f"h2load: no request succeeded on port {port}:\n{out}")
    return rps, ok


Load = Callable[[], tuple[float, int, float | None, float | None]]
TlsLoad = Callable[[Server, float], tuple[float, int, float | None, float | None]]


def tls_keep_alive(server: Server, seconds: float) -> tuple[float, int, float, float]:
    return wrk(server.port, seconds, scheme=server.scheme)


def tls_new_connections(server: Server, seconds: float) -> tuple[float, int, float, float]:
    return wrk(server.port, seconds, scheme=server.scheme, new_connections=True)


def tls_h2(server: Server, seconds: float) -> tuple[float, int, None, None]:
    rps, total = h2load(server.port, seconds, server.scheme)
    return rps, total, None, None


#: What the TLS rows are measured under: a short name, and a report section's title.
TLS_LOADS: dict[str, tuple[str, TlsLoad]] = {
    "keep-alive": ("TLS, HTTP/1.1 keep-alive, `wrk -t1 -c50 --latency`", tls_keep_alive),
    "new connections": (
        "TLS, HTTP/1.1, a new connection and a full handshake per request, "
        "`wrk -t1 -c50 --latency -H 'Connection: close'`",
        tls_new_connections,
    ),
    "h2": ("TLS, HTTP/2 by ALPN, `h2load -c 10 -m 10`", tls_h2),
}


def measured(server: Server, run: Load, max_steal: float = 100.0, tries: int = 1) -> Sample:
    """Measure once; while CPU steal exceeds ``max_steal`` %, measure again (up to ``tries``
    times) and keep the least disturbed sample. On a busy VM host this keeps a row about the
    proxy rather than about the neighbours."""
    samples = [_measure_once(server, run)]
    while (samples[-1].steal_pct or 0.0) > max_steal and len(samples) < tries:
        samples.append(_measure_once(server, run))
    return min(samples, key=lambda s: s.steal_pct or 0.0)


def _measure_once(server: Server, run: Load) -> Sample:
    before, (all_before, steal_before) = server.cpu_seconds(), cpu_times(SERVER_CPU)
    rps, total, p50, p99 = run()
    cpu = (server.cpu_seconds() - before) * 1e6 / max(total, 1)
    all_after, steal_after = cpu_times(SERVER_CPU)
    steal = 100 * (steal_after - steal_before) / max(all_after - all_before, 1)
    return Sample(rps, p50, p99, cpu, server.peak_rss_mib(), steal)


# ------------------------------------------------------------------------- report


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, list[Sample]], base: str, label: str = "nginx") -> list[str]:
    """A row per target, with ratios to the row ``base`` (called ``label`` in the header)."""
    med = {
        name: Sample(
            median([s.rps for s in ss]) or 0.0,
            median([s.p50_us for s in ss]),
            median([s.p99_us for s in ss]),
            median([s.cpu_us_per_req for s in ss]),
            max((s.rss_mib or 0.0) for s in ss) or None,
            median([s.steal_pct for s in ss]),
        )
        for name, ss in results.items()
    }
    b = med.get(base)
    rows = [
        f"| target | req/s | vs {label} | p50 us | p99 us | p99 vs {label} | proxy CPU us/req "
        f"| CPU vs {label} | peak RSS MiB | CPU 1 steal % | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        rows.append(
            f"| {name} | {m.rps:,.0f} | {ratio(m.rps, b.rps if b else None)} | {fmt(m.p50_us)} | "
            f"{fmt(m.p99_us)} | {ratio(m.p99_us, b.p99_us if b else None)} | "
            f"{fmt(m.cpu_us_per_req, '.1f')} | "
            f"{ratio(m.cpu_us_per_req, b.cpu_us_per_req if b else None)}"
            f" | {fmt(m.rss_mib, '.1f')} | {fmt(m.steal_pct)} | {len(results[name])} |"
        )
    return rows


def beside_static_table(results: dict[str, list[Sample]], module: str) -> list[str]:
    """Each row of an app from ``module`` (bench/lb_apps.py, bench/rules_apps.py) against the
    static-peer row (both with the access log off); with the load-balanced rows, nginx's 100
    servers against its one."""
    pairs = [
        (name, NO_ACCESS_LOG_ROW)
        for name, mode in FERROXY_MODES.items()
        if mode.module == module and name in results and NO_ACCESS_LOG_ROW in results
    ]
    if module == "lb_apps" and NGINX_POOL_ROW in results and "nginx" in results:
        pairs.append((NGINX_POOL_ROW, "nginx"))
    if not pairs:
        return []
    out = [
        "| row | against | req/s | req/s vs against | CPU us/req | CPU vs against |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, against in pairs:
        rps = median([s.rps for s in results[name]])
        cpu = median([s.cpu_us_per_req for s in results[name]])
        one_rps = median([s.rps for s in results[against]])
        one_cpu = median([s.cpu_us_per_req for s in results[against]])
        out.append(
            f"| {name} | {against} | {fmt(rps, ',.0f')} | {ratio(rps, one_rps)} | "
            f"{fmt(cpu, '.1f')} | {ratio(cpu, one_cpu)} |"
        )
    return out


def ab_table(results: dict[str, list[Sample]], modes: list[str]) -> list[str]:
    """Each mode on the baseline against the current ferroxy: medians, and the CPU ratio of
    each round's pair (the two ran back to back, so they share that round's conditions)."""
    rows = [
        "| mode | baseline req/s | current req/s | req/s current/baseline "
        "| baseline CPU us/req | current CPU us/req | CPU current/baseline | CPU ratio per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode in modes:
        old, new = results.get(mode + BASELINE_SUFFIX), results.get(mode)
        if not old or not new:
            continue
        rps_old, rps_new = median([s.rps for s in old]), median([s.rps for s in new])
        cpu_old = median([s.cpu_us_per_req for s in old])
        cpu_new = median([s.cpu_us_per_req for s in new])
        per_round = " ".join(
            ratio(n.cpu_us_per_req, o.cpu_us_per_req) for o, n in zip(old, new, strict=True)
        )
        rows.append(
            f"| {mode} | {fmt(rps_old, ',.0f')} | {fmt(rps_new, ',.0f')} | "
            f"{ratio(rps_new, rps_old)} | {fmt(cpu_old, '.1f')} | {fmt(cpu_new, '.1f')} | "
            f"{ratio(cpu_new, cpu_old)} | {per_round} |"
        )
    return rows


def access_log_note(
    results: dict[str, list[Sample]], suffix: str, ferroxy: Ferroxy, lines: int | None
) -> str | None:
    """The default access log's cost: the Rust path with it against the Rust path without."""
    on, off = results.get(ACCESS_LOG_ROW + suffix), results.get(NO_ACCESS_LOG_ROW + suffix)
    if not on or not off:
        return None
    rps_on, rps_off = median([s.rps for s in on]), median([s.rps for s in off])
    cpu_on = median([s.cpu_us_per_req for s in on])
    cpu_off = median([s.cpu_us_per_req for s in off])
    per_round = " ".join(ratio(a.rps, b.rps) for a, b in zip(on, off, strict=True))
    where = (
        "was written to a file with `--access-log PATH`"
        if ferroxy.has_option("--access-log")
        else "went through Python logging to stderr, as this ferroxy has no `--access-log`"
    )
    side = "baseline" if suffix else "current"
    return (
        f"- Access log, {side} ferroxy, {ferroxy.commit}: `{ACCESS_LOG_ROW + suffix}` makes "
        f"{fmt(rps_on, ',.0f')} req/s against {fmt(rps_off, ',.0f')} for "
        f"`{NO_ACCESS_LOG_ROW + suffix}`: **{ratio(rps_on, rps_off)}** (per round: {per_round}; "
        f"target: 0.90x or more), at {ratio(cpu_on, cpu_off)} the CPU per request. Its access "
        f"log, the default configuration, {where}: {fmt(lines, ',')} lines."
    )


def count_lines(path: Path) -> int | None:
    with contextlib.suppress(OSError), path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return None


def git_commit(checkout: Path) -> str:
    """The short commit of ``checkout`` ("" if it is no git checkout), marked when dirty."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=checkout
    )
    if out.returncode != 0:
        return ""
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=checkout,
    ).stdout.strip()
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def round_order(groups: list[list[str]], round_no: int) -> list[str]:
    """The targets of one round. A group is one mode on the baseline and on the current
    ferroxy, back to back: baseline first in odd rounds, current first in even ones, so
    neither side always runs second (on a warmer or a busier machine)."""
    return [name for group in groups for name in (group if round_no % 2 else group[::-1])]


# ------------------------------------------------------------------------- main


@contextlib.contextmanager
def fleet_in(workdir: Path) -> Iterator[Fleet]:
    fleet = Fleet(workdir)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one short round of ferroxy's Rust path (keeps the harness working)",
    )
    parser.add_argument(
        "--max-steal",
        type=float,
        default=10.0,
        help="re-measure a sample when CPU steal exceeds this many percent",
    )
    parser.add_argument("--tries", type=int, default=3, help="measurements per sample at most")
    parser.add_argument("--only", default="", help="comma-separated substrings of target names")
    parser.add_argument(
        "--skip", default="", help="comma-separated substrings of target names to leave out"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    parser.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="A/B: also run every ferroxy mode with the ferroxy this interpreter imports "
        "(an older build, see bench/README.md), alternating with the current one",
    )
    parser.add_argument(
        "--baseline-label",
        metavar="LABEL",
        help="the baseline's name in the report, say its commit (default: the commit of the "
        "checkout it was installed from)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 2.0, 0.5
        args.only = args.only or "upstream,ferroxy-1"
    needed = ["nginx", "wrk", "taskset"] + ([] if args.smoke else ["haproxy", "h2load", "openssl"])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (see bench/README.md)", file=sys.stderr)
        return 2
    try:
        current = Ferroxy.of(sys.executable)
        baseline = Ferroxy.of(args.baseline, args.baseline_label) if args.baseline else None
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    if baseline is not None and baseline.module == current.module:
        print(f"warning: the baseline imports the same ferroxy: {current.module}", file=sys.stderr)
    sides = ([(baseline, BASELINE_SUFFIX)] if baseline else []) + [(current, "")]
    wanted = [w for w in args.only.split(",") if w]
    unwanted = [w for w in args.skip.split(",") if w]

    def selected(name: str) -> bool:
        chosen = not wanted or any(w in name for w in wanted)
        return chosen and not any(w in name for w in unwanted)

    command = "python bench/run.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ferroxy-bench-") as tmp:
        with fleet_in(Path(tmp)) as fleet:
            upstream, pool_ports, h2c_port = start_upstream(fleet)
            targets: dict[str, Server] = {"direct to upstream": upstream}
            if selected("nginx"):
                targets["nginx"] = start_nginx(fleet, [upstream.port])
            if selected(NGINX_POOL_ROW):
                targets[NGINX_POOL_ROW] = start_nginx(fleet, pool_ports, NGINX_POOL_ROW)
            if selected("haproxy") and shutil.which("haproxy"):
                targets["haproxy"] = start_haproxy(fleet, upstream.port)
            groups = [[name] for name in targets if name != NGINX_POOL_ROW]
            if NGINX_POOL_ROW in targets:
                # Back to back with nginx's one-server row, as ferroxy's pool rows are with
                # its static peer: what spreading over 100 backends costs a proxy we did
                # not write.
                nginx_group = next((g for g in groups if g[0] == "nginx"), None)
                if nginx_group is None:
                    groups.append([NGINX_POOL_ROW])
                else:
                    nginx_group.append(NGINX_POOL_ROW)
            ab_modes, access_logs = [], {}
            static_group: list[str] | None = None
            for mode_name, mode in FERROXY_MODES.items():
                if not selected(mode_name):
                    continue
                group = []
                for ferroxy, suffix in sides:
                    if mode.beside_static and ferroxy is baseline:
                        continue
                    name = mode_name + suffix
                    targets[name], log = start_ferroxy(fleet, pool_ports, name, mode, ferroxy)
                    if log is not None:
                        access_logs[name] = log
                    group.append(name)
                if mode.beside_static and static_group is not None:
                    # Measured back to back with the static-peer row they are compared with,
                    # first in one round and last in the next, as the A/B pairs are.
                    static_group.extend(group)
                else:
                    groups.append(group)
                if mode_name == NO_ACCESS_LOG_ROW:
                    static_group = group
                if len(group) == len(sides):
                    ab_modes.append(mode_name)
            # The h2-upstream and TLS rows: the current build only, and not in a smoke run
            # (which needs neither HAProxy nor h2load).
            h2_upstream_group = []
            if not args.smoke and selected(name := H2_UPSTREAM_ROWS["haproxy"]):
                targets[name] = start_haproxy(fleet, h2c_port, name, server_options="proto h2")
                h2_upstream_group.append(name)
            if not args.smoke and selected(name := H2_UPSTREAM_ROWS["ferroxy"]):
                h2_mode = Mode("H2Upstream", module="h2_apps")
                targets[name], _ = start_ferroxy(
                    fleet, pool_ports, name, h2_mode, current, h2c_upstream=h2c_port
                )
                h2_upstream_group.append(name)
            if h2_upstream_group:
                groups.append(h2_upstream_group)
            tls_targets: dict[str, Server] = {}
            if not args.smoke and any(map(selected, TLS_ROWS.values())):
                certificate = Certificate.make(fleet.workdir)
                if selected(name := TLS_ROWS["nginx"]):
                    tls_targets[name] = start_nginx_tls(fleet, upstream.port, certificate)
                if selected(name := TLS_ROWS["haproxy"]):
                    tls_targets[name] = start_haproxy(
                        fleet,
                        upstream.port,
                        name,
                        bind_options=f"ssl crt {certificate.combined} alpn h2,http/1.1",
                        scheme="https",
                    )
                if selected(name := TLS_ROWS["ferroxy"]):
                    tls_targets[name], _ = start_ferroxy(
                        fleet,
                        pool_ports,
                        name,
                        FERROXY_MODES[NO_ACCESS_LOG_ROW],
                        current,
                        certificate=certificate,
                    )
            tls_groups = [[name] for name in tls_targets]
            tls_results: dict[str, dict[str, list[Sample]]] = {
                load: {name: [] for name in tls_targets} for load in TLS_LOADS
            }
            tls_settled = {name: negotiated(server) for name, server in tls_targets.items()}
            mitm = None
            if selected("mitmproxy") and shutil.which("mitmdump") and not args.smoke:
                mitm = start_mitmproxy(fleet, upstream.port)

            width = max(map(len, [*targets, *tls_targets]))
            for server in [*targets.values(), *tls_targets.values()]:
                wrk(server.port, args.warmup, scheme=server.scheme)
            h1: dict[str, list[Sample]] = {name: [] for name in targets}
            h2: dict[str, list[Sample]] = {n: [] for n, s in targets.items() if s.h2_port}
            single: dict[str, list[Sample]] = {name: [] for name in targets}
            for round_no in range(1, args.rounds + 1):
                order = round_order(groups, round_no)
                for name in order:
                    server = targets[name]
                    sample = measured(
                        server,
                        functools.partial(wrk, server.port, args.duration),
                        args.max_steal,
                        args.tries,
                    )
                    h1[name].append(sample)
                    print(
                        f"round {round_no} {name:{width}} {sample.rps:>10,.0f} req/s  "
                        f"p99 {fmt(sample.p99_us)} us  cpu {fmt(sample.cpu_us_per_req, '.1f')} "
                        f"us/req  steal {fmt(sample.steal_pct)}%",
                        flush=True,
                    )
                if args.smoke:
                    continue
                for name in order:
                    server = targets[name]
                    if server.h2_port:
                        rps, _ = h2load(server.h2_port, args.duration)
                        h2[name].append(Sample(rps))
                        print(
                            f"round {round_no} {name:{width}} {rps:>10,.0f} req/s h2c", flush=True
                        )
                for name in order:
                    rps, _, p50, p99 = wrk(targets[name].port, min(args.duration, 5.0), 1)
                    single[name].append(Sample(rps, p50, p99))
                tls_order = round_order(tls_groups, round_no)
                for load, (_, run) in TLS_LOADS.items():
                    for name in tls_order:
                        server = tls_targets[name]
                        sample = measured(
                            server,
                            functools.partial(run, server, args.duration),
                            args.max_steal,
                            args.tries,
                        )
                        tls_results[load][name].append(sample)
                        print(
                            f"round {round_no} {name:{width}} {sample.rps:>10,.0f} req/s  "
                            f"cpu {fmt(sample.cpu_us_per_req, '.1f')} us/req  "
                            f"steal {fmt(sample.steal_pct)}%  TLS {load}",
                            flush=True,
                        )
            if mitm is not None:
                wrk(mitm.port, 1.0)
                h1["mitmproxy (1 short round)"] = [measured(mitm, lambda: wrk(mitm.port, 3.0))]
        # Counted once the servers have stopped and flushed their logs.
        access_lines = {name: count_lines(path) for name, path in access_logs.items()}

    for name, lines in access_lines.items():
        if not lines:
            print(f"warning: {name}: its access log wrote nothing", file=sys.stderr)
    report = [
        "# Benchmark results",
        "",
        f"Command: `{command.strip()}`  ",
        f"Commit: {git_commit(REPO)}  ",
        f"Ferroxy: {current.describe()}  ",
        *([f"Baseline: {baseline.describe()}  "] if baseline else []),
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}  ",
        f"Rounds: {args.rounds} interleaved, {args.duration:g} s each, medians; "
        f"wrk on CPU {LOAD_CPU}, upstream and proxy on CPU {SERVER_CPU}, one worker each. "
        f"HTTP/1.1 samples with more than {args.max_steal:g}% CPU steal are re-measured "
        f"(up to {args.tries} tries; the least disturbed is kept)."
        + (
            " Each ferroxy mode runs on the baseline and on the current build back to back, "
            "baseline first in odd rounds, current first in even ones."
            if baseline
            else ""
        ),
        "",
        "## HTTP/1.1 keep-alive, `wrk -t1 -c50 --latency`",
        "",
        *table({n: ss for n, ss in h1.items() if n not in H2_UPSTREAM_ROWS.values()}, "nginx"),
    ]
    h2_upstream_rows = [H2_UPSTREAM_ROWS["haproxy"], H2_UPSTREAM_ROWS["ferroxy"]]
    if any(name in h1 for name in h2_upstream_rows):
        # Each h2-upstream row beside the same proxy with HTTP/1.1 to the upstream.
        beside = ["haproxy", h2_upstream_rows[0], NO_ACCESS_LOG_ROW, h2_upstream_rows[1]]
        report += [
            "",
            "## HTTP/2 to the upstream (h2c, prior knowledge), HTTP/1.1 keep-alive clients, "
            "`wrk -t1 -c50 --latency`",
            "",
            "The upstream nginx's `listen ... http2` port; each row beside the same proxy "
            "speaking HTTP/1.1 to the upstream, if it ran. No nginx row: nginx proxies to an "
            "HTTP/2 upstream only for gRPC (`grpc_pass`), not `proxy_pass`. HAProxy: "
            '`server ... proto h2`; ferroxy: `Peer(addr, alpn="h2")` (`bench/h2_apps.py`).',
            "",
            *table(
                {n: h1[n] for n in beside if n in h1},
                H2_UPSTREAM_ROWS["haproxy"],
                "haproxy h2",
            ),
        ]
    if tls_settled:
        for load, results in tls_results.items():
            title = TLS_LOADS[load][0]
            report += ["", f"## {title}", "", *table(results, TLS_ROWS["nginx"], "nginx")]
        report += [
            "",
            "TLS rows: one self-signed ECDSA P-256 certificate made at run time, one listener "
            "each offering h2 and http/1.1 by ALPN (nginx `listen ... ssl http2`, HAProxy "
            "`bind ... ssl crt ... alpn h2,http/1.1`, ferroxy `--tls-cert`), proxying HTTP/1.1 "
            "to the upstream; wrk offers no ALPN and resumes no session, h2load offers "
            "TLS_AES_128_GCM_SHA256 first. What a default OpenSSL client (as wrk) settles with "
            "each: "
            + "; ".join(f"{name}: {settled}" for name, settled in tls_settled.items())
            + ".",
        ]
    if baseline is not None and ab_modes:
        report += [
            "",
            f"## A/B, HTTP/1.1: baseline {baseline.commit} against current {current.commit}",
            "",
            *ab_table(h1, ab_modes),
        ]
    if balancing := beside_static_table(h1, "lb_apps"):
        report += [
            "",
            "## Load balancing: picking in Rust, against the same app with a static Peer",
            "",
            *balancing,
        ]
    if rules := beside_static_table(h1, "rules_apps"):
        report += [
            "",
            "## Filters and routes in Rust, against the same app with none (target: 0.90x or more)",
            "",
            *rules,
        ]
    if any(h2.values()):
        report += [
            "",
            "## h2c, `h2load -c 10 -m 10`",
            "",
            "| target | req/s | vs nginx |",
            "|---|---:|---:|",
        ]
        base = median([s.rps for s in h2.get("nginx", [])])
        for name, ss in h2.items():
            h2_rps = median([s.rps for s in ss])
            report.append(f"| {name} | {fmt(h2_rps, ',.0f')} | {ratio(h2_rps, base)} |")
    if any(single.values()) and not args.smoke:
        direct = median([s.p50_us for s in single["direct to upstream"]])
        report += [
            "",
            "## One connection, `wrk -t1 -c1`: per-hop latency",
            "",
            "| target | p50 us | p50 minus direct (the hop) | p99 us |",
            "|---|---:|---:|---:|",
        ]
        for name, ss in single.items():
            p50_median = median([s.p50_us for s in ss])
            hop = None if p50_median is None or direct is None else p50_median - direct
            report.append(
                f"| {name} | {fmt(p50_median)} | {fmt(hop)} | "
                f"{fmt(median([s.p99_us for s in ss]))} |"
            )
    notes = [
        note
        for ferroxy, suffix in sides
        if (note := access_log_note(h1, suffix, ferroxy, access_lines.get(ACCESS_LOG_ROW + suffix)))
    ]
    if notes:
        report += ["", "## Notes", "", *notes]
    if not args.smoke:
        report += [
            "",
            "## The hook bridge alone, `taskset -c 1 python bench/bridge.py`",
            "",
            "A response_filter round trip from a tokio thread to the Python loop and "
            "back, no sockets:",
            "",
            "```",
            bridge_benchmark(),
            "```",
        ]
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if not args.no_write and not args.smoke:
        (BENCH_DIR / "RESULTS.md").write_text(text + "\n" + notes_section())
    return 0


def bridge_benchmark() -> str:
    argv = pinned(SERVER_CPU, [sys.executable, str(BENCH_DIR / "bridge.py")])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if done.returncode == 3:
        # Built without the bridge-bench feature: say how to get it, keep the rest.
        return done.stderr.strip()
    done.check_returncode()
    return done.stdout.strip()


def notes_section() -> str:
    notes = BENCH_DIR / "NOTES.md"
    return notes.read_text() if notes.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
