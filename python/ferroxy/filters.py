"""Declarative filters: what most proxies do on every request (allow or deny, redirect, set
headers, rewrite, limit bodies), declared once and run by the engine in Rust, with no Python
call and no GIL::

    from ferroxy import Proxy, filters as f

    class App(Proxy):
        upstream = "127.0.0.1:9001"
        filters = [
            f.Deny(f.ClientIP(not_in=["10.0.0.0/8", "127.0.0.0/8"]), status=403),
            f.Redirect(f.Header("x-forwarded-proto", equals="http"), to="https://{host}{path}"),
            f.Respond(f.Path("/healthz"), status=200, body=b"ok"),
            f.SetRequestHeader("x-request-id", "{request_id}"),
            f.RemoveResponseHeader("server"),
            f.Cors(origins=["https://app.example.com"], methods=["GET", "POST"]),
            f.BasicAuth(f.PathPrefix("/admin/"), users={"ops": "$argon2id$v=19$..."}),
        ]

Request-phase filters run in list order before the ``request_filter`` hook; the first that
answers (Deny, Respond, Redirect, MaxBodySize, BasicAuth, a Cors preflight) ends the request
before any hook runs but ``logging``. Response-phase filters (``*ResponseHeader``, Cors's
response part) run in list order after the ``response_filter`` hook. Every filter takes an
optional condition as its first argument (it applies to every request without one).

Templates (``Redirect.to``, header values, ``RewritePath.to``) may name ``{host}`` (without
its port), ``{path}``, ``{query}`` (without ``?``), ``{request_id}`` and the capture groups
(``{1}``, ``{name}``) of the filter's regex: ``RewritePath``'s pattern, else the first
``PathRegex`` or ``Header(regex=)`` of its condition. ``{{`` and ``}}`` are braces.

Each object is checked when it is made, by the engine code that will run it: a bad regex,
CIDR, status or template raises ValueError naming the class and field
(``Redirect.to: unknown placeholder {hots}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any as _Any
from typing import overload

from . import _core

__all__ = [
    "AddRequestHeader",
    "AddResponseHeader",
    "All",
    "Any",
    "BasicAuth",
    "ClientIP",
    "Condition",
    "Cookie",
    "Cors",
    "Deny",
    "Filter",
    "Header",
    "Host",
    "IPAccess",
    "MaxBodySize",
    "Method",
    "Not",
    "Path",
    "PathPrefix",
    "PathRegex",
    "Query",
    "RateLimit",
    "Redirect",
    "RemoveRequestHeader",
    "RemoveResponseHeader",
    "RequestId",
    "Respond",
    "RewritePath",
    "SetRequestHeader",
    "SetResponseHeader",
]


class _Declared:
    """Shown and compared by its fields (``__slots__``)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[tuple[str, object], ...]:
        # Private slots hold what the engine made of the object, not what it was given.
        names = [
            n
            for cls in reversed(type(self).__mro__)
            for n in getattr(cls, "__slots__", ())
            if not n.startswith("_")
        ]
        return tuple((name, getattr(self, name)) for name in names)

    def _shown(self) -> tuple[tuple[str, object], ...]:
        return self._fields()

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._shown() if v not in (None, (), {}))
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Declared)
            and type(other) is type(self)
            and self._fields() == other._fields()
        )

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


def _text(owner: object, field: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{type(owner).__name__}.{field} must be a str, not {type(value).__name__}")
    return value


def _optional_text(owner: object, field: str, value: object) -> str | None:
    return None if value is None else _text(owner, field, value)


def _texts(owner: object, field: str, values: Iterable[object]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{type(owner).__name__}.{field} must be a list of str, not a str")
    return tuple(_text(owner, f"{field}[{i}]", v) for i, v in enumerate(values))


def _text_map(owner: object, field: str, values: object) -> dict[str, str]:
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{type(owner).__name__}.{field} must be a dict of str to str, "
            f"not {type(values).__name__}"
        )
    return {
        _text(owner, f"{field} key", k): _text(owner, f"{field}[{k!r}]", v)
        for k, v in values.items()
    }


# Conditions ---------------------------------------------------------------------------------


class Condition(_Declared):
    """When a filter applies. Combine with :class:`All`, :class:`Any` and :class:`Not`."""

    __slots__ = ()

    def _checked(self) -> None:
        _core.check_condition(self)


class Method(Condition):
    """The request's method is one of ``methods`` (``Method("GET", "HEAD")``)."""

    __slots__ = ("methods",)

    def __init__(self, *methods: str) -> None:
        if not methods:
            raise ValueError("Method.methods: name at least one method")
        self.methods = tuple(m.upper() for m in _texts(self, "methods", methods))
        self._checked()


class Path(Condition):
    """The path (without the query) is exactly ``path``."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = _text(self, "path", path)
        self._checked()


class PathPrefix(Condition):
    """The path starts with ``prefix``."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = _text(self, "prefix", prefix)
        self._checked()


class PathRegex(Condition):
    """The path matches ``pattern`` (Rust ``regex`` syntax: linear time, no look-around)."""

    __slots__ = ("pattern",)

    def __init__(self, pattern: str) -> None:
        self.pattern = _text(self, "pattern", pattern)
        self._checked()


class Host(Condition):
    """The request's host is ``host`` (``"api.example.com"``, or ``"*.example.com"`` for any
    name under it), case-insensitively, its port ignored."""

    __slots__ = ("host",)

    def __init__(self, host: str) -> None:
        self.host = _text(self, "host", host)
        self._checked()


class _Named(Condition):
    """A named value of the request is there, equals ``equals``, or matches ``regex``."""

    __slots__ = ("equals", "name", "regex")

    def __init__(self, name: str, *, equals: str | None = None, regex: str | None = None) -> None:
        self.name = _text(self, "name", name)
        self.equals = _optional_text(self, "equals", equals)
        self.regex = _optional_text(self, "regex", regex)
        self._checked()


class Header(_Named):
    """A request header (any of its values) is present, ``equals`` a value or matches
    ``regex``."""

    __slots__ = ()


class Query(_Named):
    """A query parameter (as sent, not percent-decoded) is present, ``equals`` a value or
    matches ``regex``."""

    __slots__ = ()


class Cookie(_Named):
    """A cookie (as sent) is present, ``equals`` a value or matches ``regex``."""

    __slots__ = ()


class ClientIP(Condition):
    """The client's address is in one of the networks ``in_`` (any, when not given) and in
    none of ``not_in``: CIDRs or addresses, IPv4 or IPv6."""

    __slots__ = ("in_", "not_in")

    def __init__(self, *, in_: Iterable[str] = (), not_in: Iterable[str] = ()) -> None:
        self.in_ = _texts(self, "in_", in_)
        self.not_in = _texts(self, "not_in", not_in)
        if not self.in_ and not self.not_in:
            raise ValueError("ClientIP.in_: give in_= or not_in= (or both)")
        self._checked()


def _conditions(owner: object, conditions: Iterable[object]) -> tuple[Condition, ...]:
    checked = tuple(conditions)
    for i, condition in enumerate(checked):
        if not isinstance(condition, Condition):
            raise TypeError(
                f"{type(owner).__name__}.conditions[{i}] must be a condition, "
                f"not {type(condition).__name__}"
            )
    return checked  # type: ignore[return-value]


class All(Condition):
    """Every one of ``conditions`` holds."""

    __slots__ = ("conditions",)

    def __init__(self, *conditions: Condition) -> None:
        self.conditions = _conditions(self, conditions)
        self._checked()


class Any(Condition):
    """At least one of ``conditions`` holds."""

    __slots__ = ("conditions",)

    def __init__(self, *conditions: Condition) -> None:
        self.conditions = _conditions(self, conditions)
        self._checked()


class Not(Condition):
    """``condition`` does not hold."""

    __slots__ = ("condition",)

    def __init__(self, condition: Condition) -> None:
        (self.condition,) = _conditions(self, (condition,))
        self._checked()


# Connection filters -------------------------------------------------------------------------


class IPAccess(_Declared):
    """Which clients may connect at all, as ``Proxy.connection_filter`` (or the
    ``connection_filter`` server option): nginx's ``allow`` / ``deny``, run in Rust on each
    new connection, after its PROXY protocol header (so the client behind a load balancer is
    judged) and before its TLS handshake. A refused connection is closed at once, with no
    response, and no hook or upstream sees it.

    ``deny`` wins: a client in one of its networks is refused, then one in ``allow`` is
    served; anyone else is refused when ``allow`` names networks (``allow`` alone: only
    those), served when it names none (``deny`` alone: all but those). CIDRs or addresses,
    IPv4 or IPv6 (``"::1"``); a bad one raises ValueError naming it (``IPAccess.allow[1]``).
    """

    __slots__ = ("allow", "deny")

    def __init__(self, *, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = _texts(self, "allow", allow)
        self.deny = _texts(self, "deny", deny)
        if not self.allow and not self.deny:
            raise ValueError("IPAccess.allow: give allow= or deny= (or both)")
        _core.check_ip_access(self)


# Filters ------------------------------------------------------------------------------------


class Filter(_Declared):
    """A filter: an action, applied when its condition ``when`` holds (always when None).

    A filter object keeps its engine state (``RateLimit``'s counters, ``BasicAuth``'s
    remembered verdicts) across ``Proxy.reload``: reloading a list with the very same object
    keeps it, a new object (even an equal one) starts afresh."""

    # `_compiled`: what the engine made of it, and from which fields (kept by the engine).
    __slots__ = ("_compiled", "when")

    def __init__(self, when: Condition | None) -> None:
        if when is not None and not isinstance(when, Condition):
            raise TypeError(
                f"{type(self).__name__}'s condition must be a condition, not {type(when).__name__}"
            )
        self.when = when

    def _checked(self) -> None:
        _core.check_filter(self)


def _split(owner: object, args: tuple[object, ...], names: tuple[str, ...]) -> tuple[_Any, ...]:
    """``(when, *values)`` from positional ``args``: the condition first when given."""
    if len(args) == len(names) + 1:
        return args
    if len(args) == len(names):
        return (None, *args)
    raise TypeError(
        f"{type(owner).__name__}() takes [condition,] {', '.join(names)}: got {len(args)} arguments"
    )


class Deny(Filter):
    """Answer ``status`` (default 403) with its plain-text page."""

    __slots__ = ("status",)

    def __init__(self, when: Condition | None = None, /, *, status: int = 403) -> None:
        super().__init__(when)
        self.status = status
        self._checked()


class Respond(Filter):
    """Answer ``status`` with ``body`` (a str is sent as UTF-8) and ``headers`` (fixed
    values; ``content-length`` and the hop-by-hop headers are the engine's)."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        when: Condition | None = None,
        /,
        *,
        status: int = 200,
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(when)
        self.status = status
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.headers = _text_map(self, "headers", {} if headers is None else headers)
        self._checked()


class Redirect(Filter):
    """Answer ``status`` (a 3xx, default 302) with ``Location:`` the template ``to``."""

    __slots__ = ("status", "to")

    def __init__(self, when: Condition | None = None, /, *, to: str, status: int = 302) -> None:
        super().__init__(when)
        self.to = _text(self, "to", to)
        self.status = status
        self._checked()


class _HeaderValue(Filter):
    __slots__ = ("name", "value")

    @overload
    def __init__(self, name: str, value: str, /) -> None: ...
    @overload
    def __init__(self, when: Condition | None, name: str, value: str, /) -> None: ...
    def __init__(self, *args: _Any) -> None:
        when, name, value = _split(self, args, ("name", "value"))
        super().__init__(when)
        self.name = _text(self, "name", name)
        self.value = _text(self, "value", value)
        self._checked()


class SetRequestHeader(_HeaderValue):
    """Set (replace) request header ``name`` to the template ``value`` before it goes on."""

    __slots__ = ()


class AddRequestHeader(_HeaderValue):
    """Add a value to request header ``name``, keeping those it has."""

    __slots__ = ()


class SetResponseHeader(_HeaderValue):
    """Set (replace) response header ``name`` (after ``response_filter``)."""

    __slots__ = ()


class AddResponseHeader(_HeaderValue):
    """Add a value to response header ``name`` (after ``response_filter``)."""

    __slots__ = ()


class _HeaderName(Filter):
    __slots__ = ("name",)

    @overload
    def __init__(self, name: str, /) -> None: ...
    @overload
    def __init__(self, when: Condition | None, name: str, /) -> None: ...
    def __init__(self, *args: _Any) -> None:
        when, name = _split(self, args, ("name",))
        super().__init__(when)
        self.name = _text(self, "name", name)
        self._checked()


class RemoveRequestHeader(_HeaderName):
    """Remove request header ``name`` (every value)."""

    __slots__ = ()


class RemoveResponseHeader(_HeaderName):
    """Remove response header ``name`` (after ``response_filter``)."""

    __slots__ = ()


class RewritePath(Filter):
    """When the path matches ``pattern``, make it the template ``to``, which may name the
    pattern's groups (``RewritePath(r"^/old/(.*)$", "/new/{1}")``); the query is kept."""

    __slots__ = ("pattern", "to")

    @overload
    def __init__(self, pattern: str, to: str, /) -> None: ...
    @overload
    def __init__(self, when: Condition | None, pattern: str, to: str, /) -> None: ...
    def __init__(self, *args: _Any) -> None:
        when, pattern, to = _split(self, args, ("pattern", "to"))
        super().__init__(when)
        self.pattern = _text(self, "pattern", pattern)
        self.to = _text(self, "to", to)
        self._checked()


class MaxBodySize(Filter):
    """Answer 413 to a request body longer than ``max_bytes``: at once when its length is
    announced, else when the streamed body crosses it (``error.kind`` ``body_too_large``)."""

    __slots__ = ("max_bytes",)

    @overload
    def __init__(self, max_bytes: int, /) -> None: ...
    @overload
    def __init__(self, when: Condition | None, max_bytes: int, /) -> None: ...
    def __init__(self, *args: _Any) -> None:
        when, max_bytes = _split(self, args, ("max_bytes",))
        super().__init__(when)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"MaxBodySize.max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._checked()


class RequestId(Filter):
    """Give the request an ``x-request-id`` header: the client's when it sent one, else a new
    one (32 hex digits). ``session.request_id`` and ``{request_id}`` tell it."""

    __slots__ = ()

    def __init__(self, when: Condition | None = None, /) -> None:
        super().__init__(when)
        self._checked()


class BasicAuth(Filter):
    """Let through only requests with the password of one of ``users`` (HTTP Basic
    authentication); answer the others 401 with ``WWW-Authenticate: Basic realm="<realm>",
    charset="UTF-8"``, before the upstream or any hook sees them.

    ``users`` maps each name to its password's hash: argon2 (``$argon2id$``, ``$argon2i$``,
    ``$argon2d$`` PHC strings, as ``argon2-cffi`` makes them) or bcrypt (``$2b$``, ``$2a$``,
    ``$2y$``, as ``htpasswd -B`` does). The ``Authorization`` header is passed on to the
    upstream, as nginx does. A hash costs milliseconds on purpose: each credential is
    verified once, on a blocking thread, and its verdict (pass or fail) is remembered, so a
    client that sends it again costs microseconds. Half the CPUs hash at most, and up to 64
    new credentials wait their turn; past those a request gets 503 with ``Retry-After: 1``.
    A hash that would cost too much (bcrypt cost above 16, argon2 above 1 GiB of memory or
    4 GiB of memory times passes) is a ValueError naming the user. Place a :class:`Cors`
    before it when browsers send preflights there (they carry no credentials), and an
    ``f.RateLimit`` keyed on the client before it to slow guessing."""

    __slots__ = ("realm", "users")

    def __init__(
        self, when: Condition | None = None, /, *, users: Mapping[str, str], realm: str = "ferroxy"
    ) -> None:
        super().__init__(when)
        self.users = _text_map(self, "users", users)
        self.realm = _text(self, "realm", realm)
        self._checked()

    def _shown(self) -> tuple[tuple[str, object], ...]:
        # The hashes stay out of logs and tracebacks.
        return tuple(
            (k, {name: "..." for name in self.users} if k == "users" else v)
            for k, v in self._fields()
        )


class Cors(Filter):
    """Cross-origin requests from ``origins`` (exact origins, ``"https://app.example.com"``,
    or ``["*"]`` for any), answered by the proxy.

    A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an
    allowed origin is answered 204 with ``Access-Control-Allow-Origin`` (the origin, and
    ``Vary: Origin``; ``*`` for ``["*"]``), ``-Allow-Methods`` (``methods``),
    ``-Allow-Headers`` (``headers``, the request headers a page may send), ``-Max-Age``
    (``max_age`` seconds) and ``-Allow-Credentials: true`` (``credentials``); from any other
    origin it is answered 403 without them, which the browser takes as a refusal. Neither
    reaches the upstream. Other requests are proxied; where the filter applies, the
    upstream's own ``Access-Control-*`` headers are replaced: the response to a request from
    an allowed origin gets ``Access-Control-Allow-Origin``, ``-Expose-Headers``
    (``expose_headers``) and ``-Allow-Credentials`` (``["*"]``: ``*`` on every response). The
    proxy's own answers (a 401, a 502...) get them too. Whether the filter applies is decided
    when it runs, before later filters and hooks change the request. ``"*"`` with
    ``credentials=True`` is refused (browsers ignore it), and so are origins with user info
    or a default port (``https://a.example:443``), which browsers never send."""

    __slots__ = ("credentials", "expose_headers", "headers", "max_age", "methods", "origins")

    def __init__(
        self,
        when: Condition | None = None,
        /,
        *,
        origins: Iterable[str],
        methods: Iterable[str] = ("GET", "HEAD", "POST"),
        headers: Iterable[str] = (),
        expose_headers: Iterable[str] = (),
        credentials: bool = False,
        max_age: int | None = None,
    ) -> None:
        super().__init__(when)
        self.origins = _texts(self, "origins", origins)
        self.methods = tuple(m.upper() for m in _texts(self, "methods", methods))
        self.headers = _texts(self, "headers", headers)
        self.expose_headers = _texts(self, "expose_headers", expose_headers)
        if not isinstance(credentials, bool):
            raise TypeError(f"Cors.credentials must be a bool, not {type(credentials).__name__}")
        self.credentials = credentials
        if max_age is not None and (
            isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0
        ):
            raise ValueError(f"Cors.max_age must be an int >= 0 or None, got {max_age!r}")
        self.max_age = max_age
        self._checked()


class RateLimit(Filter):
    """At most ``rate`` requests per ``key``; past it, answer ``status`` (default 429) with
    ``Retry-After`` (whole seconds, at least 1). A refused request is not counted.

    ``key``: ``"client_ip"`` (the TCP peer; an IPv6 client by its /64; behind a load
    balancer every client shares its address), ``"path"``, ``"header:NAME"``,
    ``"cookie:NAME"`` or ``"query:NAME"`` (values the client chooses: rotating them buys a
    fresh budget, so stack a ``client_ip`` limit beside; requests without that header, cookie
    or parameter share one budget). ``rate``: ``"N/s"``, ``"N/m"`` or ``"N/h"``, counted with
    a sliding-window estimate (this window's count plus the previous window's, weighted by
    how much of it the sliding window still covers). ``burst``: a key that has been quiet may
    send ``N + burst`` requests at once, and its long-run average stays N per unit (the
    counting window is ``(N + burst) / N`` units long, at most 30 days: ``rate="100/s",
    burst=50`` admits 150 per 1.5 s).

    ``store=None`` keeps the counters in this process (at most 65536 keys; past that, a new
    key evicts the least recently seen). ``store="redis://host:port/db"`` keeps them in
    Redis, so every instance with the same filter shares one limit; ``name`` names its
    counters there (filters with one name, key and rate share them; default: a hash of its
    condition, key, rate and burst, and which of the limits alike in those it is; ``name``
    needs ``store``; services sharing one Redis database should name theirs). A store check waits
    at most ``store_timeout`` seconds; when the store fails or is too slow the request passes
    (``on_store_error="allow"``, one warning on the ``ferroxy.rate_limit`` logger per 10 s)
    or gets 503 with ``Retry-After: 1`` (``on_store_error="deny"``), and the next second's
    requests skip the store.
    """

    __slots__ = (
        "burst",
        "key",
        "name",
        "on_store_error",
        "rate",
        "status",
        "store",
        "store_timeout",
    )

    def __init__(
        self,
        when: Condition | None = None,
        /,
        *,
        key: str = "client_ip",
        rate: str,
        burst: int = 0,
        status: int = 429,
        store: str | None = None,
        on_store_error: str = "allow",
        store_timeout: float = 0.05,
        name: str | None = None,
    ) -> None:
        super().__init__(when)
        self.key = _text(self, "key", key)
        self.rate = _text(self, "rate", rate)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise ValueError(f"RateLimit.burst: must be an int >= 0, got {burst!r}")
        self.burst = burst
        self.status = status
        self.store = _optional_text(self, "store", store)
        self.on_store_error = _text(self, "on_store_error", on_store_error)
        if isinstance(store_timeout, bool) or not isinstance(store_timeout, (int, float)):
            raise ValueError(f"RateLimit.store_timeout: must be seconds, got {store_timeout!r}")
        self.store_timeout = float(store_timeout)
        self.name = _optional_text(self, "name", name)
        self._checked()
