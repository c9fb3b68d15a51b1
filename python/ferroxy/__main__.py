"""Command line: ``python -m ferroxy TARGET...`` (also installed as the ``ferroxy`` command).

TARGET names the app as ``path/to/file.py:Attr`` or ``package.module:Attr`` (``Attr`` may be
dotted) and must be a Proxy or TcpProxy subclass or instance. Several TARGETs are served in
one process (``ferroxy.Server``), one ``--listen`` per TARGET in the order they are named:
``python -m ferroxy app.py:App app.py:Tcp --listen :8080 --listen :5432``.

Exit status: 0 after a graceful stop, 1 when the server cannot start, 2 for a bad TARGET or
bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from . import _core
from .proxy import Proxy
from .server import (
    DEFAULT_BLOCKING_THREADS,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_SLOW_HOOK_THRESHOLD,
    Server,
    ServerOptions,
    run,
)
from .tcp import TcpProxy
from .tls import TlsConfig

__all__ = ["main"]

_log = logging.getLogger("ferroxy")

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Name a file TARGET is imported under when its own name is taken (say ./logging.py).
_FALLBACK_MODULE_NAME = "__ferroxy_app__"

_EXIT_OK, _EXIT_START_FAILED, _EXIT_USAGE = 0, 1, 2

# The files TARGETs named, imported once each.
_IMPORTED_FILES: dict[Path, ModuleType] = {}

_Number = TypeVar("_Number", int, float)


class TargetError(Exception):
    """TARGET does not name a Proxy or TcpProxy subclass or instance."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    # Intermixed: `A --listen X B --listen Y` names two TARGETs and two --listen.
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=_LOG_FORMAT)

    several = len(args.targets) > 1
    if several and args.listen and len(args.listen) != len(args.targets):
        print(
            f"ferroxy: error: {len(args.targets)} TARGETs need one --listen each, in order "
            f"(got {len(args.listen)} --listen)",
            file=sys.stderr,
        )
        return _EXIT_USAGE
    if several and (args.tls_listen or args.tls_cert):
        print(
            "ferroxy: error: --tls-listen and --tls-cert are for one TARGET; with several, "
            "set `tls` on the apps",
            file=sys.stderr,
        )
        return _EXIT_USAGE
    apps: list[Any] = []
    for spec in args.targets:
        try:
            target = load_target(spec)
        except TargetError as error:
            print(f"ferroxy: error: {error}", file=sys.stderr)
            return _EXIT_USAGE
        try:
            apps.append(target() if isinstance(target, type) else target)
        except Exception:
            # The app's own constructor failed: its traceback is the useful part.
            traceback.print_exc()
            print(f"ferroxy: error: could not create {spec}", file=sys.stderr)
            return _EXIT_START_FAILED
    if several or isinstance(apps[0], TcpProxy):
        return _serve_services(args, apps)
    app = apps[0]

    demo_upstream = None
    try:
        if args.demo_upstream is not None:
            demo_upstream = _core.EchoUpstream(args.demo_upstream)
            _log.info("demo upstream (echo) listening on %s", demo_upstream.url)
        options: ServerOptions = {
            "threads": args.threads,
            "grace_period": args.grace_period,
            "access_log": args.access_log,
            "access_log_format": args.access_log_format,
            "blocking_threads": args.blocking_threads,
            "slow_hook_threshold": args.slow_hook_threshold,
            "hook_timeout": args.hook_timeout,
        }
        # Without --listen, the app's `listen`, else the engine's default (none with only
        # --tls-listen).
        if args.listen:
            options["listen"] = args.listen
        if args.tls_listen:
            options["tls_listen"] = args.tls_listen
        if args.proxy_protocol:
            options["proxy_protocol"] = True
        if (args.tls_cert is None) != (args.tls_key is None):
            print("ferroxy: error: --tls-cert and --tls-key go together", file=sys.stderr)
            return _EXIT_USAGE
        if args.tls_cert is not None:
            options["tls"] = _cli_certificate(app, args.tls_cert, args.tls_key)
        run(app, **options)
    except (OSError, TypeError, ValueError) as error:
        # Everything run() raises is about start-up: binding or the configuration.
        print(f"ferroxy: error: {error}", file=sys.stderr)
        return _EXIT_START_FAILED
    finally:
        if demo_upstream is not None:
            demo_upstream.stop()
    return _EXIT_OK


def _serve_services(args: argparse.Namespace, apps: list[Any]) -> int:
    """Several TARGETs (or one TcpProxy): one ``ferroxy.Server``, each app with its own
    ``--listen`` (or, without any, its own ``listen``)."""
    shared: dict[str, Any] = {
        "threads": args.threads,
        "grace_period": args.grace_period,
        "access_log": args.access_log,
        "access_log_format": args.access_log_format,
        "blocking_threads": args.blocking_threads,
        "slow_hook_threshold": args.slow_hook_threshold,
        "hook_timeout": args.hook_timeout,
    }
    if args.proxy_protocol:
        shared["proxy_protocol"] = True
    if (args.tls_cert is None) != (args.tls_key is None):
        print("ferroxy: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return _EXIT_USAGE
    if args.tls_listen:
        print(
            "ferroxy: error: --tls-listen is for one HTTP TARGET: give each app its `listen` "
            "(a ferroxy.Listener with tls=...) instead",
            file=sys.stderr,
        )
        return _EXIT_USAGE
    server = Server(**shared)
    for i, app in enumerate(apps):
        own: dict[str, Any] = {}
        if args.listen:
            # One TARGET takes every --listen, as a single Proxy does.
            own["listen"] = args.listen[i] if len(apps) > 1 else args.listen
        if args.tls_cert is not None:
            own["tls"] = _cli_certificate(app, args.tls_cert, args.tls_key)
        server.add(app, **own)
    demo_upstream = None
    try:
        if args.demo_upstream is not None:
            demo_upstream = _core.EchoUpstream(args.demo_upstream)
            _log.info("demo upstream (echo) listening on %s", demo_upstream.url)
        server.run()
    except (OSError, TypeError, ValueError) as error:
        print(f"ferroxy: error: {error}", file=sys.stderr)
        return _EXIT_START_FAILED
    finally:
        if demo_upstream is not None:
            demo_upstream.stop()
    return _EXIT_OK


def _cli_certificate(app: Any, cert: str, key: str) -> TlsConfig:
    """--tls-cert/--tls-key: the app's first TlsConfig with these files, so that its client
    certificate policy stays (replacing it whole would quietly turn mutual TLS off)."""
    declared = getattr(app, "tls", None)
    first = declared if isinstance(declared, TlsConfig) else next(iter(declared or ()), None)
    if isinstance(first, TlsConfig):
        return dataclasses.replace(first, cert=cert, key=key)
    return TlsConfig(cert=cert, key=key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferroxy",
        description="Serve ferroxy Proxy and TcpProxy apps (several in one process).",
        epilog="example: python -m ferroxy examples/hello.py:App --demo-upstream 127.0.0.1:8081",
    )
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="the app: path/to/file.py:Attr or package.module:Attr; several are served in "
        "one process, each on its own --listen",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help=(
            "address to serve on, or fd:N for an inherited listening socket; repeat to listen"
            " on several; with several TARGETs, one per TARGET in their order (default: the"
            f" app's `listen`, else {_core.DEFAULTS['listen']})"
        ),
    )
    parser.add_argument(
        "--tls-listen",
        action="append",
        metavar="HOST:PORT",
        help="an address to serve TLS on, beside the --listen ones; repeat for several (with "
        "--tls-cert and no --tls-listen, every --listen address serves TLS)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="the certificate chain for TLS listeners (overrides the app's `tls`); SIGHUP "
        "reloads it",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every listener expects a PROXY protocol header (v1 or v2) from the load balancer "
        "in front, and takes the client address from it; connections without one are closed",
    )
    parser.add_argument(
        "--threads",
        type=_non_negative(int),
        default=_core.DEFAULTS["threads"],
        metavar="N",
        help="engine threads; 0 means one per CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=_non_negative(float),
        default=DEFAULT_GRACE_PERIOD,
        metavar="S",
        help="seconds in-flight requests may run on after SIGINT/SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--blocking-threads",
        type=int,
        default=DEFAULT_BLOCKING_THREADS,
        metavar="N",
        help="threads that run @ferroxy.blocking hooks (default: %(default)s)",
    )
    parser.add_argument(
        "--slow-hook-threshold",
        type=float,
        default=DEFAULT_SLOW_HOOK_THRESHOLD,
        metavar="S",
        help="warn about a hook that holds the Python thread longer than this many seconds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--hook-timeout",
        type=float,
        default=DEFAULT_HOOK_TIMEOUT,
        metavar="S",
        help="answer 504 when a hook is still waiting after this many seconds, cancelling an "
        "async one (default: no limit)",
    )
    parser.add_argument(
        "--demo-upstream",
        metavar="HOST:PORT",
        help="also start the built-in echo server on this address, to proxy to",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        default="info",
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        default=_core.DEFAULTS["access_log"],
        metavar="PATH",
        help="where a line per request goes: a file, - for stdout, off for none; SIGUSR1 "
        "reopens the file (default: %(default)s)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_const",
        const="off",
        help="the same as --access-log off",
    )
    parser.add_argument(
        "--access-log-format",
        default=_core.DEFAULTS["access_log_format"],
        metavar="FMT",
        help="combined (nginx's), json, or a template of field names such as "
        "'{client} {method} {path} {status} {duration}' (default: %(default)s)",
    )
    return parser


def _non_negative(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """An argparse ``type`` that parses with ``kind`` and rejects negative numbers."""

    def parse(text: str) -> _Number:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value

    # argparse names the type in "invalid int value: 'x'" from __name__.
    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


def load_target(target: str) -> type[Proxy[Any] | TcpProxy] | Proxy[Any] | TcpProxy:
    """Import the app TARGET names; raises TargetError saying what is wrong."""
    location, colon, attr_path = target.rpartition(":")
    if not colon or not location or not attr_path:
        raise TargetError(
            f"TARGET must look like path/to/app.py:App or package.module:App, not {target!r}"
        )
    if location.endswith(".py") or "/" in location or os.sep in location:
        module = _import_file(Path(location))
    else:
        module = _import_module(location)

    app: object = module
    for name in attr_path.split("."):
        try:
            app = getattr(app, name)
        except AttributeError:
            raise TargetError(f"{location} has no attribute {attr_path!r}") from None

    if isinstance(app, (Proxy, TcpProxy)) or (
        isinstance(app, type) and issubclass(app, (Proxy, TcpProxy))
    ):
        return app
    raise TargetError(
        f"{target} is {_describe(app)}, not a ferroxy.Proxy or TcpProxy subclass or instance"
    )


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    path = path.resolve()
    # Once per file: `app.py:App app.py:Tcp` share one module (and its balancers).
    imported = _IMPORTED_FILES.get(path)
    if imported is not None:
        return imported
    # Like `python path/to/app.py`: the app's directory is importable, for its helpers.
    sys.path.insert(0, str(path.parent))
    name = path.stem if path.stem not in sys.modules else _FALLBACK_MODULE_NAME
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as an import would: dataclasses and pickle look it up.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _IMPORTED_FILES[path] = module
    return module


def _import_module(name: str) -> ModuleType:
    # Like `python -m`: modules in the working directory are importable (the console
    # script does not get that for free).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # Only a missing TARGET module is a usage error; a missing import inside it is the
        # app's bug and keeps its traceback.
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            raise TargetError(f"no module named {name!r}") from None
        raise


def _describe(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    return f"a {type(value).__name__}"


if __name__ == "__main__":
    sys.exit(main())
