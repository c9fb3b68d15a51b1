"""TLS on the proxy's listeners: :class:`TlsConfig`, set as ``Proxy.tls`` (or the ``tls``
server option). The engine reads the files once at start-up, and again on
``Proxy.reload_tls()`` or SIGHUP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

__all__ = ["TlsConfig"]


@dataclass(frozen=True)
class TlsConfig:
    """A certificate chain and its key, as PEM files.

    Give ``Proxy.tls`` a list of them to serve several names: each client gets the one whose
    certificate names the host it asks for (SNI; exact names first, then wildcards such as
    ``*.example.com``), and the first when none does. ALPN offers h2 and http/1.1; TLS 1.2
    and 1.3 only.

    ``client_auth="required"`` (or ``"optional"``) asks clients for a certificate signed by
    ``client_ca``; the verified one is on ``session.tls.client_cert``. In a list, the first
    config's ``client_ca``, ``client_auth`` and ``handshake_timeout`` apply to all.
    """

    cert: str | os.PathLike[str]
    key: str | os.PathLike[str]
    client_ca: str | os.PathLike[str] | None = None
    client_auth: Literal["none", "optional", "required"] = "none"
    #: Seconds a client may take to complete its handshake (None: the engine's default, 60).
    handshake_timeout: float | None = None
