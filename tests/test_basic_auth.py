"""BasicAuth over real sockets: the 401 challenge, wrong and unknown credentials, argon2 and
bcrypt users, the condition's scope, and the cache that keeps a repeated credential from
costing a password hash each time. The echo upstream counts what reached it."""

from __future__ import annotations

import base64
import os
import re
import socket
import time
from typing import Any

import httpx
import pytest
from conftest import raw_connect, read_response, simple_request
from ferroxy import Proxy
from ferroxy import filters as f
from ferroxy.testing import EchoServer, request, simulate

# Made once with argon2-cffi (argon2's recommended m=19456,t=2,p=1) and bcrypt (cost 10): each
# costs a few tens of milliseconds to verify, as in production.
OPS_ARGON2ID = (
    "$argon2id$v=19$m=19456,t=2,p=1$kzuqpoEUPCkH0SDGco8XSA$"
    "Un15cTYcgiIp8e5OECWtkXuB3T2CjUlKdJByPfhfRYY"
)  # "s3cret"
AUDIT_ARGON2I = (
    "$argon2i$v=19$m=19456,t=2,p=1$Qc0HRBeklutMfN8tIUM7GA$"
    "BNAvSXZnucwUOpNA2yYBM12w/zW62NNCQCsBB4qAty8"
)  # "plain-i"
DEV_BCRYPT = "$2b$10$LU2z2SCJnyH2LEhNVUbGJ.s7h/NV30StIgYYfGGOck9MCWNolpibm"  # "hunter2"
USERS = {"ops": OPS_ARGON2ID, "audit": AUDIT_ARGON2I, "dev": DEV_BCRYPT}
CHALLENGE = 'Basic realm="ferroxy", charset="UTF-8"'


def basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def app(upstream: EchoServer, *filters: f.Filter) -> type[Proxy]:
    return type("App", (Proxy,), {"upstream": upstream.addr, "filters": list(filters)})


@pytest.fixture
def admin(ferroxy_upstream, ferroxy_proxy) -> Any:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.BasicAuth(f.PathPrefix("/admin/"), users=USERS)),
        access_log=False,
    )
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("ops", "wrong"),
        basic("nobody", "s3cret"),
        basic("dev", "s3cret"),
        {"authorization": "Basic !!!not-base64"},
        {"authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"authorization": "Bearer s3cret"},
    ],
    ids=[
        "none",
        "wrong-password",
        "unknown-user",
        "other-users-password",
        "bad-base64",
        "no-colon",
        "other-scheme",
    ],
)
def test_refused_credentials_get_the_challenge_and_never_reach_the_upstream(
    ferroxy_upstream, admin, headers
) -> None:
    r = admin.get("/admin/panel", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == CHALLENGE
    assert r.text == "401 Unauthorized\n"
    assert ferroxy_upstream.requests == 0


@pytest.mark.parametrize(
    ("name", "password"),
    [("ops", "s3cret"), ("audit", "plain-i"), ("dev", "hunter2")],
    ids=["argon2id", "argon2i", "bcrypt"],
)
def test_valid_users_are_proxied_with_their_authorization(
    ferroxy_upstream, admin, name, password
) -> None:
    credential = basic(name, password)
    sent = admin.get("/admin/panel", headers=credential).json()
    assert sent["path"] == "/admin/panel"
    # Kept, as nginx does: the upstream may want to know who asked.
    assert sent["headers"]["authorization"] == credential["authorization"]
    assert ferroxy_upstream.requests == 1


def test_only_the_condition_s_paths_ask_for_a_password(ferroxy_upstream, admin) -> None:
    assert admin.get("/public").json()["path"] == "/public"
    assert admin.get("/admin").json()["path"] == "/admin"
    assert admin.get("/admin/").status_code == 401


def test_a_realm_is_named_in_the_challenge(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.BasicAuth(users={"dev": DEV_BCRYPT}, realm="Staff only")),
        access_log=False,
    )
    r = httpx.get(proxy.url + "/")
    assert r.headers["www-authenticate"] == 'Basic realm="Staff only", charset="UTF-8"'


def _timed(client: httpx.Client, headers: dict[str, str], expect: int) -> float:
    started = time.perf_counter()
    assert client.get("/admin/", headers=headers).status_code == expect
    return time.perf_counter() - started


def test_a_repeated_credential_costs_no_hash(admin) -> None:
    # What one verification costs here: distinct wrong passwords, each hashed.
    hashing = min(_timed(admin, basic("ops", f"guess-{i}"), 401) for i in range(3))
    valid = basic("ops", "s3cret")
    _timed(admin, valid, 200)
    started = time.perf_counter()
    for _ in range(200):
        assert admin.get("/admin/", headers=valid).status_code == 200
    cached = time.perf_counter() - started
    # Hashed each time, 200 requests would take 200 * hashing; cached, a small part of it.
    assert cached < 200 * hashing / 5, f"200 cached: {cached:.3f}s; one hash: {hashing:.4f}s"
    # A refused credential is remembered too: sent again, it is not hashed again.
    wrong = basic("ops", "guess-0")
    again = min(_timed(admin, wrong, 401) for _ in range(3))
    assert again < hashing / 2, f"again: {again:.4f}s; one hash: {hashing:.4f}s"


def _threads() -> int:
    # The proxy serves from this process: its blocking hash threads are among these.
    return len(os.listdir("/proc/self/task"))


def _send_guesses(port: int, count: int, tag: str) -> list[socket.socket]:
    """Connections that each sent a request with a credential never seen before."""
    sockets = []
    for i in range(count):
        sock = raw_connect(port)
        token = base64.b64encode(f"ops:{tag}-{i}".encode()).decode()
        sock.sendall(simple_request("GET", "/admin/", extra=f"Authorization: Basic {token}\r\n"))
        sockets.append(sock)
    return sockets


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_clients_that_go_away_do_not_pile_up_hashes(admin) -> None:
    port = httpx.URL(str(admin.base_url)).port
    assert port is not None
    # Start the hashing threads a valid login needs, so that they count in the baseline.
    assert admin.get("/admin/", headers=basic("ops", "s3cret")).status_code == 200
    before = _threads()
    for sock in _send_guesses(port, 40, "gone"):
        sock.close()
    # Queued behind whatever still runs: once it is answered, the guesses that were hashing
    # are done, and those that had not started were dropped with their clients.
    assert admin.get("/admin/", headers=basic("ops", "after")).status_code == 401
    # One hashing thread per CPU at the very most (half of them hash), not one per client.
    assert _threads() <= before + (os.cpu_count() or 1), (before, _threads())


def test_past_the_queue_of_hashes_clients_get_503_with_retry_after(admin) -> None:
    port = httpx.URL(str(admin.base_url)).port
    assert port is not None
    # Far more new credentials at once than the 64 that may wait (and the hashing slots).
    sockets = _send_guesses(port, 64 + (os.cpu_count() or 1) + 40, "flood")
    statuses = []
    for sock in sockets:
        with sock, sock.makefile("rb") as rfile:
            answer = read_response(rfile)
            statuses.append(answer.status)
            if answer.status == 503:
                assert answer.header("retry-after") == "1"
    assert set(statuses) == {401, 503}, statuses
    # The refused ones were not judged: sent again when it is quiet, each gets its verdict.
    assert admin.get("/admin/", headers=basic("ops", "s3cret")).status_code == 200


def test_simulate_verifies_credentials_too() -> None:
    class App(Proxy):
        upstream = "127.0.0.1:9"
        filters = (f.BasicAuth(users={"dev": DEV_BCRYPT}),)

    refused = simulate(App, request("GET", "/", headers=basic("dev", "wrong")))
    assert (refused.status, refused.upstream_request) == (401, None)
    allowed = simulate(App, request("GET", "/", headers=basic("dev", "hunter2")))
    assert allowed.status == 200 and allowed.upstream_request is not None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: f.BasicAuth(users={"ops": "plain"}), 'BasicAuth.users["ops"]: not an argon2'),
        (
            lambda: f.BasicAuth(users={"ops": OPS_ARGON2ID.replace("m=19456", "m=1")}),
            'BasicAuth.users["ops"]: bad argon2 parameters',
        ),
        (lambda: f.BasicAuth(users={"dev": "$2b$10$short"}), 'BasicAuth.users["dev"]: not bcrypt'),
        (
            lambda: f.BasicAuth(users={"dev": DEV_BCRYPT.replace("$10$", "$20$")}),
            'BasicAuth.users["dev"]: cost too high: one check would take 2^20 bcrypt rounds',
        ),
        (
            lambda: f.BasicAuth(users={"ops": OPS_ARGON2ID.replace("m=19456", "m=4194304")}),
            'BasicAuth.users["ops"]: cost too high: one check would fill 4096 MiB 2 times',
        ),
        (lambda: f.BasicAuth(users={}), "BasicAuth.users: give at least one user"),
        (
            lambda: f.BasicAuth(users={"a:b": DEV_BCRYPT}),
            'BasicAuth.users["a:b"]: a user name is not empty',
        ),
        (lambda: f.BasicAuth(users=USERS, realm='say "hi"'), "BasicAuth.realm: must be printable"),
    ],
)
def test_bad_users_name_the_field_and_the_user(make, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_the_hashes_stay_out_of_the_repr() -> None:
    shown = repr(f.BasicAuth(f.PathPrefix("/admin/"), users=USERS))
    assert "ops" in shown and "$argon2" not in shown and "$2b$" not in shown
