"""Type stubs for ferroxy._core, the pyo3 layer over the Rust engine.

Users import these types from ``ferroxy``; ``Server``, ``Call`` and ``EchoUpstream`` are
plumbing used by ``ferroxy.server`` and ``ferroxy.testing``.
"""

import os
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
)
from typing import Any, Final, Literal, Protocol, TypeAlias, TypedDict, TypeVar, final, overload

from _typeshed import SupportsKeysAndGetItem

from .compression import Compression
from .filters import Condition, Filter, IPAccess
from .listener import Listener
from .routes import Route
from .tls import TlsConfig

_T = TypeVar("_T")

__version__: str

#: The phases an app can override, in the order the engine runs them (the engine's
#: ``phase::HOOK_NAMES``).
HOOK_NAMES: Final[tuple[str, ...]]

class _CompressionDefaults(TypedDict):
    encodings: list[str]
    types: list[str]
    min_length: int
    decompress: bool
    levels: dict[str, int]

class _Defaults(TypedDict):
    listen: str
    access_log: str
    access_log_format: str
    threads: int
    grace_period: float
    client_read_timeout: float
    client_write_timeout: float
    keepalive_timeout: float
    tunnel_idle_timeout: float
    pool_idle_timeout: float
    pool_max_idle_per_peer: int
    connect_timeout: float
    read_timeout: float
    write_timeout: float
    idle_timeout: float
    compression: _CompressionDefaults
    #: ``TcpServer``'s ``idle_timeout`` and ``connect_tries`` (``TcpProxyConfig``).
    tcp_idle_timeout: float
    tcp_connect_tries: int

#: The engine's defaults (``ServerConfig``, ``PoolConfig`` and ``PeerTimeouts::default()``),
#: by the keyword of ``Server(...)`` or ``Peer(...)`` that overrides each.
DEFAULTS: Final[_Defaults]

#: The request-side hooks one trip to Python may run, in the bit order of ``Call.steps``.
REQUEST_STEPS: Final[tuple[str, str, str]]

def set_log_level(level: int) -> None:
    """Lowest Python logging level the engine forwards to the ``ferroxy`` loggers."""

def check_filter(filter: Filter, /) -> None:
    """Check ``filter`` as the engine will run it: ValueError naming its class and field."""

def check_condition(condition: Condition, /) -> None:
    """Check ``condition`` as the engine will run it: ValueError naming its class and field."""

def check_route(route: Route, /) -> None:
    """Check ``route`` as the engine will run it: ValueError naming the field."""

def check_ip_access(access: IPAccess, /) -> None:
    """Check ``access`` as the engine will run it: ValueError naming the entry."""

def step(phase: Coroutine[Any, Any, Any], threshold: float) -> tuple[bool, Any, float] | None:
    """Take one step of ``phase`` (``send(None)``), timed: ``None`` when it finished within
    ``threshold`` seconds; else ``(finished, value, held)``, ``value`` being its result or what
    it waits on and ``held`` the seconds the step took. What the step raises propagates."""

#: What builds headers: a mapping (a ``Headers`` too) or (name, value) pairs.
_HeadersInput: TypeAlias = (
    SupportsKeysAndGetItem[str, str | bytes] | Iterable[tuple[str, str | bytes]]
)

@final
class Headers(MutableMapping[str, str]):
    """Case-insensitive, multi-valued, mutable view over headers held in Rust.

    A ``MutableMapping`` from each name to its first value: ``h[name]``, ``get``, ``in``,
    ``keys()``/``values()``/``items()``, ``len`` and iteration see each distinct name once
    (lower-cased); ``h[name] = v`` replaces every value; ``del h[name]`` and ``pop`` remove
    them all; ``update`` replaces the names it is given. For several values: ``add`` appends
    one, ``get_all`` lists them, ``multi_items()`` lists every pair in order. Equal to a
    mapping with the same names and, name by name, the same values.

    Values are bytes on the wire and Latin-1 as ``str``, both ways, so ``h[k] = h[k]`` sends
    the bytes that came in. Setting a ``str`` with a character beyond U+00FF raises
    ValueError: pass ``bytes`` (``value.encode()``) for another encoding; ``get_bytes`` and
    ``get_all_bytes`` read the bytes as they are. A value with CR, LF, NUL or another control
    character raises ValueError naming the header.

    ``Headers(headers)`` builds a free-standing set, e.g. for ``Response(headers=...)``.
    """

    def __new__(cls, headers: _HeadersInput | None = None, /) -> Headers: ...
    def __getitem__(self, name: str, /) -> str: ...
    def __setitem__(self, name: str, value: str | bytes, /) -> None: ...
    def __delitem__(self, name: str, /) -> None: ...
    def __contains__(self, name: object, /) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def get_all(self, name: str) -> list[str]: ...
    @overload
    def get_bytes(self, name: str) -> bytes | None: ...
    @overload
    def get_bytes(self, name: str, default: _T) -> bytes | _T: ...
    def get_all_bytes(self, name: str) -> list[bytes]: ...
    def add(self, name: str, value: str | bytes) -> None: ...
    def multi_items(self) -> list[tuple[str, str]]: ...
    # As dict's, with str | bytes accepted wherever a value is set.
    @overload
    def get(self, name: str, default: None = None, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...
    @overload
    def get(self, name: str, default: _T, /) -> str | _T: ...
    @overload
    def pop(self, name: str, /) -> str: ...
    @overload
    def pop(self, name: str, default: str, /) -> str: ...
    @overload
    def pop(self, name: str, default: _T, /) -> str | _T: ...
    def setdefault(self, name: str, default: str | bytes, /) -> str: ...
    def update(self, other: _HeadersInput | None = None, /, **names: str | bytes) -> None: ...

@final
class HealthCheck:
    """Active health checks for a :class:`LoadBalancer`: each backend probed every
    ``interval`` seconds (each on its own), marked unhealthy after ``unhealthy`` failed
    probes in a row and healthy again after ``healthy`` passed ones. An option left out
    keeps the engine's default (the properties show it). A bad value raises ValueError
    naming the field (``health_check.interval``)."""

    @staticmethod
    def http(
        path: str,
        *,
        interval: float | None = None,
        timeout: float | None = None,
        healthy: int | None = None,
        unhealthy: int | None = None,
        expect_status: int | Iterable[int] | None = None,
        host: str | None = None,
    ) -> HealthCheck:
        """An HTTP/1.1 GET of ``path`` (``Host``: the backend's address unless ``host`` is
        given), passing when the status is in ``expect_status`` (default 200-399)."""
    @staticmethod
    def tcp(
        *,
        interval: float | None = None,
        timeout: float | None = None,
        healthy: int | None = None,
        unhealthy: int | None = None,
    ) -> HealthCheck:
        """A TCP connect, passing when it completes within ``timeout``."""
    @property
    def kind(self) -> str:
        """``"http"`` or ``"tcp"``."""
    @property
    def path(self) -> str | None: ...
    @property
    def interval(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def healthy(self) -> int: ...
    @property
    def unhealthy(self) -> int: ...

@final
class LoadBalancer:
    """Backends and a strategy, chosen among in Rust. ``backends`` are ``"host:port"`` or
    ``("host:port", weight)``; ``strategy`` is ``"round_robin"``, ``"weighted_round_robin"``,
    ``"random"``, ``"least_connections"`` or ``"consistent"`` (Ketama, as nginx hashes).
    ``hash_key`` is what "consistent" hashes of each request when the balancer is a Proxy's
    ``upstream``: ``"client_ip"``, ``"path"``, ``"header:NAME"``, ``"cookie:NAME"`` or
    ``"query:NAME"``. ``max_retries`` (default 2) more tries go to other backends after a
    failed connect, and after a reset on a reused connection for idempotent requests whose
    body was kept; ``try_timeout`` bounds each try and ``deadline`` all of them (seconds,
    from the request's arrival). A bad value raises ValueError naming the field.

    ``health_check`` probes the backends while a proxy server runs. Passive checks eject a
    backend after ``max_fails`` failures in a row (connect failures, failed exchanges, 5xx;
    0 turns them off) for ``fail_timeout`` seconds, doubling while it keeps failing up to
    ``max_fail_timeout``. ``on_health_change(backend, healthy)`` is called (on a thread of
    its own) for each change, ``backend`` as :meth:`backends` shows it.

    A backend whose host is a name (``"api.internal:8080"``) stands for every address it
    resolves to (A and AAAA, each a backend with its weight), resolved here and again every
    ``dns_refresh`` seconds while a proxy server runs. A bad option, or a name that does not
    resolve, raises ValueError naming the field (``backends[1]``)."""

    def __new__(
        cls,
        backends: Sequence[str | tuple[str, int]],
        *,
        strategy: str = "round_robin",
        hash_key: str | None = None,
        health_check: HealthCheck | None = None,
        max_retries: int | None = None,
        try_timeout: float | None = None,
        deadline: float | None = None,
        on_health_change: Callable[[dict[str, Any], bool], object] | None = None,
        max_fails: int | None = None,
        fail_timeout: float | None = None,
        max_fail_timeout: float | None = None,
        dns_refresh: float | None = None,
        seed: int | None = None,
    ) -> LoadBalancer: ...
    @property
    def strategy(self) -> str: ...
    @property
    def max_retries(self) -> int: ...
    def select(self, key: str | bytes | None = None) -> Peer:
        """A healthy backend's peer (``key`` is what "consistent" hashes); RuntimeError if
        none is healthy."""
    def backends(self) -> list[dict[str, Any]]:
        """Each backend's ``addr``, ``weight``, ``healthy``, ``in_flight`` and the totals
        ``requests`` (times selected) and ``failures`` (observed on its requests)."""
    def set_backends(self, backends: Sequence[str | tuple[str, int]]) -> None:
        """Replace the backends at once, names resolved again; a bad list changes nothing
        (ValueError)."""

@final
class Peer:
    """An upstream to connect to: ``"host:port"`` plus per-peer timeouts in seconds, and TLS
    to it if ``tls`` is set."""

    def __new__(
        cls,
        addr: str,
        *,
        connect_timeout: float | None = ...,
        read_timeout: float | None = ...,
        write_timeout: float | None = ...,
        idle_timeout: float | None = ...,
        tls: bool = ...,
        sni: str | None = ...,
        verify_cert: bool = ...,
        verify_hostname: bool = ...,
        ca: str | os.PathLike[str] | None = ...,
        client_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = ...,
        alpn: Literal["h1", "h2", "h2,h1"] | None = ...,
    ) -> Peer:
        """A timeout left out (or None) is the engine's default: ``DEFAULTS["connect_timeout"]``
        and so on.

        With ``tls``: ``sni`` defaults to the host of ``addr`` when it is a name (``""``: send
        none); the certificate is checked against the webpki roots, or ``ca``'s certificates
        instead; ``verify_hostname=False`` checks the chain but not the name,
        ``verify_cert=False`` nothing. ``client_cert`` is ``(cert.pem, key.pem)``. ``alpn``
        offers ``"h1"`` (default), ``"h2"`` or both (``"h2,h1"``: the upstream picks);
        without ``tls``, ``"h2"`` is cleartext HTTP/2 with prior knowledge. Files are read
        here: ValueError naming the field when one is bad."""
    @property
    def addr(self) -> str: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def read_timeout(self) -> float: ...
    @property
    def write_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def tls(self) -> bool: ...
    @property
    def sni(self) -> str | None: ...
    @property
    def verify_cert(self) -> bool: ...
    @property
    def verify_hostname(self) -> bool: ...
    @property
    def ca(self) -> str | None: ...
    @property
    def client_cert(self) -> tuple[str, str] | None: ...
    @property
    def alpn(self) -> str: ...

@final
class Response:
    """A response generated by the proxy itself (from request_filter or fail_to_proxy)."""

    def __new__(
        cls,
        status: int,
        headers: _HeadersInput | None = None,
        body: bytes | str | None = None,
    ) -> Response: ...
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def body(self) -> bytes: ...

@final
class RequestHeader:
    """The request line and headers: the downstream request, or the one sent upstream."""

    method: str
    path: str
    query: str
    @property
    def version(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def client_addr(self) -> str: ...
    @property
    def uri(self) -> str: ...

@final
class ResponseHeader:
    """The status line and headers of the upstream's response."""

    status: int
    @property
    def version(self) -> str: ...
    @property
    def headers(self) -> Headers: ...

@final
class ClientConn:
    """The downstream connection a request arrived on."""

    @property
    def client_addr(self) -> str: ...
    @property
    def local_addr(self) -> str:
        """The address the client connected to (the proxy's), ``host:port``."""
    @property
    def scheme(self) -> str:
        """``"http"`` or ``"https"``."""
    @property
    def protocol(self) -> str:
        """``"HTTP/1.1"``, ``"HTTP/2"``, ..."""
    @property
    def tls(self) -> bool: ...
    @property
    def client_certificates(self) -> list[bytes]:
        """The client's certificate chain (DER, leaf first) from a mutual-TLS handshake."""
    @property
    def sni(self) -> str | None: ...
    @property
    def alpn(self) -> str | None: ...

@final
class TlsInfo:
    """What the client's TLS handshake settled (``session.tls``)."""

    @property
    def version(self) -> str | None:
        """``"TLSv1.3"`` or ``"TLSv1.2"`` (as nginx's ``$ssl_protocol`` writes it)."""
    @property
    def cipher(self) -> str | None:
        """The cipher suite's IANA name, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
    @property
    def alpn(self) -> str | None:
        """``"h2"`` or ``"http/1.1"``."""
    @property
    def sni(self) -> str | None:
        """The server name the client asked for."""
    @property
    def client_cert(self) -> ClientCert | None:
        """The client's verified certificate (mutual TLS), or None."""

@final
class ClientCert:
    """A verified client certificate's facts."""

    @property
    def subject(self) -> str:
        """RFC 4514, e.g. ``"CN=alice,O=Example"``."""
    @property
    def issuer(self) -> str: ...
    @property
    def sans(self) -> list[str]:
        """Subject alternative names: DNS names, IP addresses, e-mail addresses, URIs."""
    @property
    def serial(self) -> str:
        """Hex, colon separated, as openssl prints it."""
    @property
    def sha256_fingerprint(self) -> str:
        """SHA-256 of the DER, lower-case hex."""
    @property
    def pem(self) -> str: ...

@final
class ServerConn:
    """The upstream connection a request was sent over."""

    @property
    def peer_addr(self) -> str: ...
    @property
    def local_addr(self) -> str: ...
    @property
    def protocol(self) -> str:
        """``"HTTP/1.1"`` or ``"HTTP/2"``."""
    @property
    def reused(self) -> bool:
        """True when it came from the pool, False when opened for this request."""

@final
class Session:
    """One downstream request as it moves through the phases."""

    ctx: Any
    @property
    def req(self) -> RequestHeader: ...
    @property
    def client_addr(self) -> str: ...
    @property
    def client_conn(self) -> ClientConn: ...
    @property
    def tls(self) -> TlsInfo | None:
        """What the client's TLS handshake settled; None on a plain connection."""
    @property
    def server_conn(self) -> ServerConn | None:
        """None until the request has been sent upstream (set in response_filter, logging)."""
    @property
    def route(self) -> Route | None:
        """The app's ``Route`` that matched (None when none did, or it has no routes)."""
    @property
    def request_id(self) -> str | None:
        """The request's id: the one a filter gave or read (``RequestId``, ``{request_id}``),
        else the client's ``x-request-id``; None without either."""
    def read_request_body(self, limit: int = 1048576) -> Awaitable[bytes]:
        """Await the whole request body, at most ``limit`` bytes (default 1 MiB, nginx's
        ``client_max_body_size``), in ``request_filter``, ``upstream_peer`` or
        ``upstream_request_filter``, before it goes upstream; the bytes read are then the
        body sent upstream (through ``request_body_filter``, if any), and reading again, in
        a retry's ``upstream_peer`` too, gives them again. Raises RequestBodyError above the
        limit (``status`` 413) or when the client's upload fails (left unhandled, the
        client gets that status); RuntimeError outside those hooks. A hook that stops
        waiting (``hook_timeout``, ``asyncio.wait_for``) may still answer the client; it
        cannot send the request on without the body."""
    def upstream_request(self) -> RequestHeader:
        """A preview of ``req`` as the engine would forward it now (hop-by-hop headers
        removed, X-Forwarded-* set). Edits to it are not sent: edit ``upstream_request`` in
        upstream_request_filter for that."""

class RequestBodyError(Exception):
    """``Session.read_request_body`` could not read the body; ``status`` says why (413: over
    the limit)."""

    status: int

@final
class ProxyError:
    """Why a request could not be proxied: ``kind`` is a short code such as
    ``"connect_refused"``, ``"tls_handshake"`` (the message says what failed: wrong hostname,
    unknown CA, expired certificate), ``"read_timeout"``, ``"hook_error"`` or
    ``"hook_timeout"``."""

    @property
    def kind(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def side(self) -> str:
        """Whose doing the failure was: ``"client"``, ``"upstream"`` or ``"proxy"``."""
    @property
    def peer(self) -> Peer | None: ...
    @property
    def status(self) -> int: ...
    @property
    def tries(self) -> list[dict[str, str]]:
        """Every failed try, in order: ``peer``, ``kind`` and ``message`` of each."""
    @property
    def retry(self) -> bool:
        """Whether the proxy tries again after this failure (see ``fail_to_connect``)."""

@final
class Call:
    """One phase handed to Python; the dispatcher completes it exactly once."""

    @property
    def session(self) -> Session: ...
    @property
    def steps(self) -> int:
        """The request-side hooks this trip runs: bit 0 request_filter, 1 upstream_peer,
        2 upstream_request_filter."""
    @property
    def upstream_request(self) -> RequestHeader:
        """The request head that will be sent upstream, built on first use."""
    @property
    def upstream_response(self) -> ResponseHeader | None: ...
    @property
    def error(self) -> ProxyError | None: ...
    def proceed(self, peer: Peer | None = None) -> None:
        """Go on proxying (to ``peer`` when this trip chose one), with ``upstream_request``
        as the trip left it."""
    def respond(self, response: Response) -> None: ...
    def retry(self, retry: bool) -> None:
        """fail_to_connect's answer: try again (True) or fail (False)."""
    def fail(self, hook: str, message: str) -> None:
        """``hook`` failed; the engine picks the status (502 for upstream_peer, else 500)."""
    def time_out(self, hook: str, seconds: float) -> None:
        """``hook`` was still running after ``seconds`` (the hook timeout) and was abandoned:
        a 504, and later hooks see ``error.kind == "hook_timeout"``."""

@final
class ConnectionCall:
    """One ``connection_filter`` call handed to Python; the dispatcher answers it once."""

    @property
    def client_addr(self) -> str:
        """``host:port``, as ``Session.client_addr`` shows it (``[::1]:5000`` for IPv6)."""
    def answer(self, accept: bool) -> None:
        """Serve the connection (True) or close it unanswered (False)."""

@final
class StreamCall:
    """One body chunk or WebSocket message handed to Python; the dispatcher answers it once."""

    @property
    def hook(self) -> str:
        """``request_body_filter``, ``response_body_filter`` or ``websocket_message``."""
    @property
    def session(self) -> Session: ...
    @property
    def data(self) -> bytes | str:
        """The chunk, or the message (str for a text one)."""
    @property
    def flag(self) -> bool:
        """``end_of_stream`` for a chunk, ``from_client`` for a message."""
    def is_pending(self) -> bool:
        """Not answered yet."""
    def keep(self) -> None:
        """Send it as it came."""
    def replace(self, data: bytes | bytearray | memoryview | str) -> None:
        """Send ``data`` instead (str only for a message); TypeError for another type."""
    def drop(self) -> None:
        """Send nothing for this message (TypeError for a chunk)."""
    def fail(self, hook: str, message: str) -> None:
        """``hook`` failed: a body ends with the error, a message is dropped."""
    def time_out(self, hook: str, seconds: float) -> None:
        """``hook`` ran past the hook timeout and was abandoned."""

class Dispatcher(Protocol):
    """What Server.run_pending calls, on the thread that runs it. ``connection_phase`` is
    called only for an app whose ``hooks`` name ``connection_filter``, ``stream_phase``
    only for one whose hooks name a body filter or ``websocket_message``."""

    def request_phase(self, call: Call, /) -> None: ...
    def response_phase(self, call: Call, /) -> None: ...
    def connect_fail_phase(self, call: Call, /) -> None: ...
    def fail_phase(self, call: Call, /) -> None: ...
    def logging_phase(self, session: Session, error: ProxyError | None, /) -> None: ...
    def connection_phase(self, call: ConnectionCall, /) -> None: ...
    def stream_phase(self, call: StreamCall, /) -> None: ...
    def emit_logs(self, records: list[tuple[str, int, str]], /) -> None: ...
    def stopped(self) -> None: ...

@final
class Server:
    def __new__(
        cls,
        dispatcher: Dispatcher,
        *,
        hooks: Iterable[str] | None = None,
        upstream: Peer | LoadBalancer | None = None,
        listen: str | Listener | Sequence[str | Listener] | None = ...,
        threads: int | None = ...,
        grace_period: float | None = ...,
        client_read_timeout: float | None = ...,
        client_write_timeout: float | None = ...,
        keepalive_timeout: float | None = ...,
        pool_idle_timeout: float | None = ...,
        pool_max_idle_per_peer: int | None = ...,
        access_log: str | os.PathLike[str] | bool | None = ...,
        access_log_format: str | None = ...,
        balancers: Sequence[LoadBalancer] | None = None,
        filters: Sequence[Filter] | None = None,
        routes: Sequence[Route] | None = None,
        tls: TlsConfig | Sequence[TlsConfig] | None = None,
        tls_listen: str | Sequence[str] | None = None,
        proxy_protocol: bool | None = None,
        tunnel_idle_timeout: float | None = None,
        compression: Compression | None = None,
        connection_filter: IPAccess | None = None,
    ) -> Server:
        """An option left out (or None) is the engine's default, as in ``DEFAULTS``;
        ``hooks`` are names from ``HOOK_NAMES``, or ``"connection_filter"`` (ValueError for
        another; not together with ``connection_filter=``, the declarative one). ``access_log`` is
        a file path, ``"-"`` (stdout, also True) or ``"off"`` (also False); the file is opened
        here (OSError names it). ``access_log_format`` is ``"combined"``, ``"json"`` or a
        template such as ``"{client} {status}"`` (ValueError names what is wrong)."""
    def start(self) -> None:
        """Bind and start serving on the engine's runtime; raises OSError naming the address."""
    def reload(
        self,
        *,
        filters: Sequence[Filter] | None = None,
        routes: Sequence[Route] | None = None,
        balancers: Sequence[LoadBalancer] | None = None,
    ) -> None:
        """Swap in ``filters`` and/or ``routes`` (None keeps the current list) at once for the
        requests that arrive from now on; those in flight finish on the old set. Checked as
        at start-up (ValueError naming ``filters[i]``, nothing changed); RuntimeError when
        the server is not running. ``balancers``: the new routes' load balancers, whose
        health checks and DNS refresh start unless this server already runs them."""
    def reload_tls(self) -> bool:
        """Read every TLS listener's files again (True if there are any); ValueError naming
        a file that cannot be used, and the certificates in use stay."""
    def reopen_access_log(self) -> None:
        """Reopen the access log file at its path (after logrotate renamed it): lines logged
        from now on go to the new file. Returns at once; does nothing for stdout or off."""
    @property
    def addr(self) -> str:
        """The first listener's address."""
    @property
    def addrs(self) -> list[str]:
        """Every listener's address, in the order given."""
    @property
    def schemes(self) -> list[str]:
        """Each listener's ``"http"`` or ``"https"``, in the order of ``addrs``."""
    @property
    def port(self) -> int: ...
    @property
    def python_calls(self) -> int:
        """Phase calls handed to Python so far (log records not counted)."""
    def fileno(self) -> int:
        """A descriptor that becomes readable when run_pending has work."""
    def bench_bridge(self, trips: int, in_flight: int = 1) -> float:
        """Time ``trips`` response_filter round trips through the hook bridge alone (no
        sockets), ``in_flight`` at a time; returns seconds. Blocks: call it from an executor
        while this server's loop drains ``run_pending``. Only in builds with the
        ``bridge-bench`` cargo feature (see bench/README.md)."""
    def simulate(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        client_addr: str,
        local_addr: str,
        upstream: Response | None = None,
    ) -> Simulation:
        """Run one request through the phases with no sockets, every upstream answering
        ``upstream`` (default: an empty 200); the outcome is ready once
        ``dispatcher.stopped()`` has been called. See ``ferroxy.testing.simulate``."""
    def run_pending(self) -> int:
        """Run queued work on this thread; returns how many items ran."""
    def shutdown(self, grace_period: float | None = None) -> None:
        """Stop accepting; in-flight requests get the grace period; then
        ``dispatcher.stopped()`` is called from run_pending."""
    @property
    def stopped(self) -> bool: ...

@final
class TcpPeerCall:
    """One TCP ``upstream_peer`` call handed to Python; the dispatcher answers it once."""

    @property
    def client_addr(self) -> str:
        """``host:port`` of the client whose connection needs an upstream."""
    def answer(self, peer: Peer) -> None:
        """Connect the client to ``peer`` (a ``pool.select()`` pick counts in flight on its
        backend while the connection lasts)."""
    def fail(self, message: str) -> None:
        """The hook failed: close the client's connection."""

class TcpDispatcher(Protocol):
    """What TcpServer.run_pending calls, on the thread that runs it: ``peer_phase`` only with
    ``upstream_peer=True``, ``connection_phase`` only with ``connection_filter_hook=True``."""

    def peer_phase(self, call: TcpPeerCall, /) -> None: ...
    def connection_phase(self, call: ConnectionCall, /) -> None: ...
    def emit_logs(self, records: list[tuple[str, int, str]], /) -> None: ...
    def stopped(self) -> None: ...

@final
class TcpServer:
    """The engine's TCP (L4) proxy on its own runtime: bytes copied in Rust, the upstream
    fixed (``upstream``) or asked of ``dispatcher.peer_phase`` per connection."""

    def __new__(
        cls,
        dispatcher: TcpDispatcher,
        *,
        upstream: Peer | LoadBalancer | None = None,
        upstream_peer: bool = False,
        connection_filter_hook: bool = False,
        listen: str | Listener | Sequence[str | Listener] | None = None,
        tls: TlsConfig | Sequence[TlsConfig] | None = None,
        proxy_protocol: bool | None = None,
        connection_filter: IPAccess | None = None,
        idle_timeout: float | None = None,
        connect_tries: int | None = None,
        threads: int | None = None,
        grace_period: float | None = None,
        balancers: Sequence[LoadBalancer] | None = None,
    ) -> TcpServer:
        """An option left out (or None) is the engine's default (``DEFAULTS``); ValueError
        names a bad one."""
    def start(self) -> None:
        """Bind and start serving; raises OSError naming the address."""
    @property
    def addr(self) -> str: ...
    @property
    def addrs(self) -> list[str]: ...
    @property
    def schemes(self) -> list[str]:
        """Each listener's ``"tcp"`` or ``"tls"``, in the order of ``addrs``."""
    @property
    def port(self) -> int: ...
    @property
    def python_calls(self) -> int:
        """Hook calls handed to Python so far."""
    def fileno(self) -> int: ...
    @property
    def stopped(self) -> bool: ...
    def reload_tls(self) -> bool:
        """Read the TLS listeners' files again (True if there are any)."""
    def shutdown(self, grace_period: float | None = None) -> None:
        """Stop accepting; open connections get the grace period; then
        ``dispatcher.stopped()`` is called from run_pending."""
    def run_pending(self) -> int:
        """Run queued work on this thread; returns how many items ran."""

@final
class TcpEchoUpstream:
    """A TCP byte echo on its own runtime, for tests. Starts at construction."""

    def __new__(cls, listen: str = "127.0.0.1:0") -> TcpEchoUpstream: ...
    @property
    def addr(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
    def stop(self) -> None: ...

@final
class EchoUpstream:
    """The built-in echo upstream, on its own runtime. Starts at construction."""

    def __new__(
        cls,
        listen: str = "127.0.0.1:0",
        *,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        client_ca: str | os.PathLike[str] | None = None,
    ) -> EchoUpstream: ...
    @property
    def addr(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
    @property
    def requests(self) -> int: ...
    def stop(self) -> None: ...

@final
class Simulation:
    """A simulated request under way (see ``Server.simulate``)."""

    def result(self) -> SimulationResult:
        """The outcome; RuntimeError until the simulation has finished."""

@final
class SimulationResult:
    """What a simulated request came to."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def body(self) -> bytes: ...
    @property
    def upstream_request(self) -> RequestHeader | None:
        """What the upstream was sent; None when nothing was proxied."""
    @property
    def upstream_body(self) -> bytes | None: ...
    @property
    def peer(self) -> Peer | None: ...
    @property
    def error(self) -> ProxyError | None:
        """What fail_to_proxy and logging saw; None on success."""
