"""Incremental HTTP content decoding (gzip, deflate, br, zstd) for bodies fed chunk by chunk."""

from __future__ import annotations

import zlib

import brotli

try:  # Python >= 3.14
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # mitmproxy depends on the backport below 3.14
    from backports import zstd  # type: ignore[no-redef,unused-ignore]


class DecodeError(ValueError):
    """The body is not valid for its Content-Encoding."""


class Decoder:
    """Decode one body fed in chunks: ``feed(chunk) -> bytes``, then ``finish() -> bytes``.

    Raises :class:`DecodeError` on corrupt data or an unknown encoding.
    """

    def __init__(self, encoding: str | None) -> None:
        enc = (encoding or "identity").strip().lower()
        if enc in ("", "identity", "none"):
            enc = "identity"
        if enc not in ("identity", "gzip", "x-gzip", "deflate", "br", "zstd"):
            raise DecodeError(f"unsupported content-encoding {encoding!r}")
        self.encoding = enc
        self._obj = self._new()
        self._first = True

    def _new(self):
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(wbits=31)
        if self.encoding == "deflate":
            return zlib.decompressobj(wbits=15)
        if self.encoding == "br":
            return brotli.Decompressor()
        if self.encoding == "zstd":
            return zstd.ZstdDecompressor()
        return None

    def feed(self, chunk: bytes) -> bytes:
        if self._obj is None or not chunk:
            return bytes(chunk)
        try:
            if self.encoding == "br":
                return self._obj.process(chunk)
            if self.encoding == "zstd":
                self._first = False
                return self._feed_zstd(chunk)
            return self._feed_zlib(chunk)
        except DecodeError:
            raise
        except Exception as e:  # zlib.error, brotli.error, zstd.ZstdError
            raise DecodeError(f"corrupt {self.encoding} data: {e}") from e

    def _feed_zlib(self, chunk: bytes) -> bytes:
        if self._first and self.encoding == "deflate":
            # "deflate" is zlib-wrapped per the RFC, but some servers send raw deflate.
            self._first = False
            try:
                probe = zlib.decompressobj(wbits=15)
                out = probe.decompress(chunk)
                self._obj = probe
                return out
            except zlib.error:
                self._obj = zlib.decompressobj(wbits=-15)
        self._first = False
        pieces = [self._obj.decompress(chunk)]
        while self._obj.eof and self._obj.unused_data:  # concatenated gzip members
            rest = self._obj.unused_data
            self._obj = self._new()
            pieces.append(self._obj.decompress(rest))
        return b"".join(pieces)

    def _feed_zstd(self, chunk: bytes) -> bytes:
        out = [self._obj.decompress(chunk)]
        while self._obj.eof and self._obj.unused_data:  # concatenated frames
            rest = self._obj.unused_data
            self._obj = self._new()
            out.append(self._obj.decompress(rest))
        return b"".join(out)

    def finish(self) -> bytes:
        """Flush what is left; raise :class:`DecodeError` if the body ended early."""
        if self._obj is None:
            return b""
        if self.encoding == "br":
            if not self._obj.is_finished():
                raise DecodeError("truncated br data")
            return b""
        if not self._obj.eof and not self._first:
            raise DecodeError(f"truncated {self.encoding} data")
        return self._obj.flush() if hasattr(self._obj, "flush") else b""


def decode_body(data: bytes, encoding: str | None) -> bytes:
    """Decode a whole body; raise :class:`DecodeError` on bad data."""
    if not encoding or encoding.strip().lower() in ("identity", "none", ""):
        return data
    d = Decoder(encoding)
    return d.feed(data) + d.finish()
