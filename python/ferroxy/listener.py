"""Per-listener settings: :class:`Listener`, given in ``Proxy.listen`` or the ``listen`` server
option beside plain addresses, for one process serving, say, plain HTTP, TLS with its own
certificates and PROXY-protocol traffic from a balancer, each on its own address."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .tls import TlsConfig

__all__ = ["Listener"]


@dataclass(frozen=True)
class Listener:
    """One listener that says all about itself: ``addr`` (``host:port``, or ``fd:N`` for an
    inherited listening socket), its certificates when it speaks TLS (a ``TlsConfig``, or a
    list of them chosen by SNI), and whether each of its connections begins with a PROXY
    protocol header (v1 or v2) from the load balancer in front.

    The ``tls``, ``tls_listen`` and ``proxy_protocol`` server options (and ``Proxy.tls``) are
    shorthands for the listeners given as plain address strings; a ``Listener`` is not
    changed by them.
    """

    addr: str
    tls: TlsConfig | Sequence[TlsConfig] | None = None
    proxy_protocol: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.addr, str):
            raise TypeError(f"Listener.addr must be a str, not {type(self.addr).__name__}")
        if not isinstance(self.proxy_protocol, bool):
            raise TypeError(
                f"Listener.proxy_protocol must be a bool, not {type(self.proxy_protocol).__name__}"
            )
        if isinstance(self.tls, list):
            # Frozen and hashable, as a TlsConfig is.
            object.__setattr__(self, "tls", tuple(self.tls))
