"""The ferroxy app with declarative filters and routes the benchmark runs (issue 9): kept apart
from apps.py so that a baseline built before filters existed can still import that one. The
upstream comes from FERROXY_BENCH_UPSTREAM, as for apps.py.

Twenty filters of the kinds most proxies run, none of which answers the benchmark's request
(a ``GET /`` from 127.0.0.1), so every one is tested and the headers ones all apply; a hundred
routes by host and prefix, the benchmark's request matching the last one only after every
other kind failed: its host is none of the exact ones (a hash miss) nor under any wildcard
(each suffix compared), and every longer any-host prefix is tried before its ``/``."""

from __future__ import annotations

import os

from ferroxy import Peer, Proxy, Route
from ferroxy import filters as f

UPSTREAM = Peer(os.environ.get("FERROXY_BENCH_UPSTREAM", "127.0.0.1:18080"))
#: Where the routes the benchmark's request does not take would go (never connected to).
ELSEWHERE = Peer("127.0.0.1:9")

FILTERS = [
    f.Deny(f.ClientIP(not_in=["127.0.0.0/8", "10.0.0.0/8", "::1/128"]), status=403),
    f.Deny(f.ClientIP(in_=["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"])),
    f.Redirect(f.Header("x-forwarded-proto", equals="http"), to="https://{host}{path}", status=308),
    f.Respond(f.Path("/healthz"), status=200, body=b"ok"),
    f.Respond(f.Path("/robots.txt"), body=b"User-agent: *\nDisallow: /\n"),
    f.Deny(f.Method("TRACE"), status=405),
    f.Deny(f.PathRegex(r"\.(php|asp|aspx)$"), status=404),
    f.Deny(f.Header("user-agent", regex="(?i)(badbot|scrapy)")),
    f.Redirect(f.PathPrefix("/old/"), to="/new/", status=301),
    f.Deny(f.All(f.PathPrefix("/admin/"), f.Not(f.Cookie("session"))), status=401),
    f.MaxBodySize(10 * 1024 * 1024),
    f.RequestId(),
    f.RewritePath(r"^/v1/(.*)$", "/api/{1}"),
    f.SetRequestHeader("x-client-path", "{path}"),
    f.SetRequestHeader("x-proxy", "ferroxy"),
    f.RemoveRequestHeader("x-debug"),
    f.RemoveResponseHeader("server"),
    f.SetResponseHeader("strict-transport-security", "max-age=63072000"),
    f.SetResponseHeader("x-content-type-options", "nosniff"),
    f.AddResponseHeader("x-request-id", "{request_id}"),
]

ROUTES = [
    # 60 exact hosts, each with a prefix of its own.
    *(
        Route(host=f"svc{i}.example.com", path_prefix=f"/api/v{i}/", upstream=ELSEWHERE)
        for i in range(60)
    ),
    # 20 wildcard hosts.
    *(Route(host=f"*.tenant{i}.example.com", upstream=ELSEWHERE) for i in range(20)),
    # 19 prefixes for any host, none of them the benchmark's path.
    *(Route(path_prefix=f"/static{i}/", upstream=ELSEWHERE, strip_prefix=True) for i in range(19)),
    # The benchmark's request: any host, any path (the shortest prefix: tried last).
    Route(path_prefix="/", upstream=UPSTREAM),
]
assert (len(FILTERS), len(ROUTES)) == (20, 100)


class FiltersRoutes(Proxy):
    """Twenty filters and a hundred routes, run in Rust: no Python per request."""

    filters = FILTERS
    routes = ROUTES
