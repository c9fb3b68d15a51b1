"""Memory per idle client connection: ferroxy beside nginx, same machine, same run.

    python bench/idle_memory.py                  # 10,000 connections, 3 rounds each; ~1 min
    python bench/idle_memory.py --connections 2000 --rounds 1 --no-write

For each proxy (nginx, `worker_processes 1`; ferroxy's pure Rust path, bench/apps.py:RustPath
in its default configuration) in front of the nginx upstream of bench/run.py: open N
keep-alive connections, send one request on each and read its response, keep them all open,
and read the proxy's RSS (VmRSS summed over its processes). Per connection: RSS with all of
them open minus RSS before, over N. Then close them all and wait until the proxy has closed
its side, and go again: RSS after each round shows whether freed memory is reused. Last, the
slowloris figure: 1,000 connections that each sent half a request head.

Replaces the "## Memory per idle connection" section of bench/RESULTS.md (unless --no-write).
Every process it starts is stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import (
    BENCH_DIR,
    Ferroxy,
    Mode,
    Server,
    fleet_in,
    git_commit,
    start_ferroxy,
    start_nginx,
    start_upstream,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: idle-memory\r\n\r\n"
# Half a request head: the request line and part of a header, never finished.
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slo"
SECTION = "## Memory per idle connection"
# Connections opened (and, for REQUEST, answered) at a time: keeps the proxy's upstream
# connections few, so the figure is the client connections' own.
BATCH = 100


@dataclasses.dataclass
class Round:
    before_kib: int
    open_kib: int
    after_kib: int


@dataclasses.dataclass
class Target:
    name: str
    rounds: list[Round]
    slowloris_kib: int


def open_fds(server: Server) -> int:
    total = 0
    for pid in server.pids():
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


#: How long the connections stay idle before they are measured.
IDLE_FOR = 1.0


def settled_rss(server: Server) -> int:
    """VmRSS once it has stopped moving (three equal readings 100 ms apart)."""
    readings = [server.memory_kib("VmRSS")]

    def steady() -> bool:
        readings.append(server.memory_kib("VmRSS"))
        return len(readings) >= 3 and max(readings[-3:]) - min(readings[-3:]) < 64

    deadline = time.monotonic() + 10
    while not steady() and time.monotonic() < deadline:
        time.sleep(0.1)
    return readings[-1]


def response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length is None:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    return len(body) >= int(length.group(1))


def open_connections(port: int, count: int, payload: bytes, answered: bool) -> list[socket.socket]:
    """``count`` connections that each sent ``payload``; with ``answered``, each response has
    been read in full (the connection is then idle, kept alive)."""
    conns: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        for start in range(0, count, BATCH):
            group = [
                socket.create_connection(("127.0.0.1", port), timeout=10)
                for _ in range(min(BATCH, count - start))
            ]
            for conn in group:
                conn.sendall(payload)
                conn.setblocking(False)
            conns.extend(group)
            if not answered:
                continue
            pending = {conn: b"" for conn in group}
            for conn in group:
                selector.register(conn, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(pending)} responses missing after 30s")
                for key, _ in selector.select(1.0):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    chunk = ready.recv(65536)
                    if not chunk:
                        raise RuntimeError("the proxy closed a connection before answering")
                    pending[ready] += chunk
                    if response_complete(pending[ready]):
                        selector.unregister(ready)
                        del pending[ready]
    return conns


def close_all(server: Server, conns: list[socket.socket], fds_before: int) -> None:
    for conn in conns:
        conn.close()
    # Each proxy closes its side when it reads the EOF: wait for its descriptors to go.
    wait_until(lambda: open_fds(server) <= fds_before + 10, f"{server.name} to close")


def warmed_up(server: Server) -> int:
    """Open the upstream connection and fill lazy state with a first batch of requests;
    returns the proxy's descriptor count once that batch is closed."""
    close_all(server, open_connections(server.port, BATCH, REQUEST, True), open_fds(server))
    return open_fds(server)


def idle_rounds(server: Server, connections: int, rounds: int) -> list[Round]:
    fds_before = warmed_up(server)
    results = []
    for round_no in range(1, rounds + 1):
        before = settled_rss(server)
        conns = open_connections(server.port, connections, REQUEST, True)
        # Idle means idle for a moment, not just answered: ferroxy gives an HTTP/1
        # connection's buffers back once it has been quiet 250-500 ms (nginx at once).
        time.sleep(IDLE_FOR)
        with_open = settled_rss(server)
        close_all(server, conns, fds_before)
        results.append(Round(before, with_open, settled_rss(server)))
        per = (with_open - results[0].before_kib) / connections
        print(
            f"{server.name}: round {round_no}: {before / 1024:.1f} MiB before, "
            f"{with_open / 1024:.1f} MiB with {connections:,} idle ({per:.1f} KiB each), "
            f"{results[-1].after_kib / 1024:.1f} MiB after closing",
            flush=True,
        )
    return results


def slowloris_growth(server: Server, slowloris: int) -> int:
    fds_before = warmed_up(server)
    before = settled_rss(server)
    conns = open_connections(server.port, slowloris, HALF_HEAD, False)
    growth = settled_rss(server) - before
    close_all(server, conns, fds_before)
    print(f"{server.name}: {slowloris:,} slowloris heads: +{growth / 1024:.1f} MiB", flush=True)
    return growth


def report(targets: list[Target], connections: int, slowloris: int, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Commit: {git_commit(BENCH_DIR.parent)}  ",
        f"{connections:,} HTTP/1.1 keep-alive connections, each idle after one answered "
        "request; RSS is VmRSS summed over the proxy's processes, read once it is steady. "
        "Per connection: (RSS with all open - RSS before round 1) / connections. Rounds open "
        "and close all of them in turn on the same process: RSS with all open that climbs "
        "from round to round would be memory not reused. The slowloris figure is taken on a "
        "fresh process.",
        "",
        "| target | round | RSS before MiB | RSS with all open MiB | per idle connection KiB "
        "| RSS after closing MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target in targets:
        for no, r in enumerate(target.rounds, 1):
            per = (r.open_kib - target.rounds[0].before_kib) / connections
            lines.append(
                f"| {target.name} | {no} | {r.before_kib / 1024:.1f} | {r.open_kib / 1024:.1f} "
                f"| {per:.1f} | {r.after_kib / 1024:.1f} |"
            )
    lines += [
        "",
        f"Slowloris: {slowloris:,} connections that each sent half a request head and "
        "nothing more.",
        "",
        "| target | RSS growth MiB | per connection KiB |",
        "|---|---:|---:|",
    ]
    for target in targets:
        lines.append(
            f"| {target.name} | {target.slowloris_kib / 1024:.1f} "
            f"| {target.slowloris_kib / slowloris:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Put ``section`` in bench/RESULTS.md in place of the one it replaces, else at the end."""
    path = BENCH_DIR / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slowloris", type=int, default=1_000)
    parser.add_argument("--only", default="", help="comma-separated substrings of target names")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    # This process holds every client socket; the proxies inherit the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max(args.connections, args.slowloris) + 1_000
    if hard != resource.RLIM_INFINITY and hard < needed:
        print(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it first", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    wanted = [w for w in args.only.split(",") if w]
    ferroxy = Ferroxy.of(sys.executable)
    command = "python bench/idle_memory.py " + " ".join(sys.argv[1:])
    targets = []
    with tempfile.TemporaryDirectory(prefix="ferroxy-idle-") as tmp, fleet_in(Path(tmp)) as fleet:
        upstream, upstream_ports, _ = start_upstream(fleet)
        starters: dict[str, Callable[[], Server]] = {
            "nginx": lambda: start_nginx(fleet, [upstream.port], worker_connections=needed),
            # Its default thread count on this machine (one per CPU), although pinned.
            "ferroxy rust path": lambda: start_ferroxy(
                fleet,
                upstream_ports,
                "ferroxy rust path",
                Mode("RustPath", access_log=True),
                ferroxy,
                threads=os.cpu_count() or 1,
            )[0],
        }
        for name, start in starters.items():
            if wanted and not any(w in name for w in wanted):
                continue
            # A fresh process for each figure: memory a round leaves with the allocator
            # would hide the next figure's growth.
            server = start()
            rounds = idle_rounds(server, args.connections, args.rounds)
            server.stop()
            server = start()
            targets.append(Target(name, rounds, slowloris_growth(server, args.slowloris)))
            server.stop()
    text = report(targets, args.connections, args.slowloris, command.strip())
    print("\n" + text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
