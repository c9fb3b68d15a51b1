"""Response compression in Rust: :class:`Compression`, set as ``Proxy.compression`` (or the
``compression`` server option). Built once at start-up; every response is then looked at,
and compressed, without Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Compression"]


@dataclass(frozen=True)
class Compression:
    """Compress upstream responses for clients that accept it (``Accept-Encoding``).

    The coding is the one the client gives the highest q-value among ``encodings``, ties going
    to the order of ``encodings``. Responses are compressed when their ``Content-Type`` is in
    ``types`` (``"text/*"`` covers a family) and their length, when known, is at least
    ``min_length``. They are left alone when already encoded, partial (206), without a body
    (HEAD, 204, 304), or marked ``Cache-Control: no-transform``. A compressed response loses
    its Content-Length and gets ``Vary: Accept-Encoding``; its ETag is weakened.

    An upstream's own gzip, brotli or zstd is decoded for a client that does not take it
    (``decompress``), and encoded again in a coding the client does take.

    A field left None takes the engine's default (``_core.DEFAULTS["compression"]``):
    ``("zstd", "br", "gzip")``; text, JSON, JavaScript, XML, WebAssembly and SVG; 256 bytes;
    levels gzip 6, brotli 4, zstd 3; decompress.
    """

    #: Codings to offer, from ``"zstd"``, ``"br"`` and ``"gzip"``, in order of preference.
    encodings: Sequence[str] | None = None
    #: Media types to compress, lowercase: ``"application/json"``, or ``"text/*"``.
    types: Sequence[str] | None = None
    #: Bodies of known length below this many bytes stay as they are.
    min_length: int | None = None
    #: One level for every coding (gzip 1-9, brotli 0-11, zstd 1-19; higher is smaller and
    #: slower), in place of each one's default.
    level: int | None = None
    #: Decode an upstream's gzip, brotli or zstd body for a client that does not accept that
    #: coding (encoding it again in one the client takes, when there is one). Default: True.
    decompress: bool | None = None
