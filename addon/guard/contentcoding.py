"""Content codings (gzip, deflate, br, zstd) decoded in bounded steps, for bodies the relay reads but passes on
as they came: answers (``addon.metering.meter``) and request bodies (``addon.guard.callbody``).

Plain Python (no mitmproxy import). Each step yields a bounded piece, so a compression bomb costs its
reader only as much as it chooses to read.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

import brotli
import zstandard

# Decoded bytes produced per decompression step: what a highly compressed chunk (or a bomb) can
# make this process hold at once, instead of its whole expansion.
_STEP = 64 * 2**10
# zstd's incremental API has no output limit: feed it input in slices this small instead. One zstd
# block (>= 3 bytes of input) expands to at most 128 KiB, so a slice yields at most ~6 MiB.
_ZSTD_SLICE = 128
# RFC 9659: a zstd content coding uses a window of at most 8 MiB; a larger one would be a memory grab.
_ZSTD_MAX_WINDOW = 8 * 2**20


class Decoder(Protocol):
    @property
    def finished(self) -> bool:
        """Whether the compressed stream has ended."""
        ...

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded pieces of bounded size, produced lazily as they are consumed.

        Input after the end of the compressed stream is ignored.
        """
        ...


class _ZlibDecoder:
    """gzip (wbits 47 also accepts a zlib header) or deflate, zlib-wrapped or raw (sniffed)."""

    def __init__(self, wbits: int | None) -> None:
        self._head = b""  # wbits None: deflate, decided by the first two bytes
        self._d = zlib.decompressobj(wbits) if wbits is not None else None

    @property
    def finished(self) -> bool:
        return self._d is not None and self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        d = self._d
        if d is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            # RFC 1950 header: method 8 and a check sum; "deflate" servers often send raw RFC 1951.
            zlib_wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._d = d = zlib.decompressobj(15 if zlib_wrapped else -15)
            self._head = b""
        while data and not d.eof:
            out = d.decompress(data, _STEP)
            if out:
                yield out
            data = d.unconsumed_tail
            # A full step may leave output inside zlib with no input left: ask again to drain it.
            while not data and len(out) == _STEP and not d.eof:
                out = d.decompress(b"", _STEP)
                if out:
                    yield out


class _BrotliDecoder:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    @property
    def finished(self) -> bool:
        return bool(self._d.is_finished())

    def feed(self, data: bytes) -> Iterator[bytes]:
        d = self._d
        if d.is_finished():
            return
        out = d.process(data, output_buffer_limit=_STEP)
        if out:
            yield out
        while not d.can_accept_more_data():
            out = d.process(b"", output_buffer_limit=_STEP)
            if out:
                yield out


class _ZstdDecoder:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()

    @property
    def finished(self) -> bool:
        return bool(self._d.eof)

    def feed(self, data: bytes) -> Iterator[bytes]:
        d = self._d
        for i in range(0, len(data), _ZSTD_SLICE):
            if d.eof:
                return
            out = d.decompress(data[i:i + _ZSTD_SLICE])
            if out:
                yield out


_DECODERS: dict[str, Callable[[], Decoder]] = {
    "gzip": lambda: _ZlibDecoder(47),
    "x-gzip": lambda: _ZlibDecoder(47),
    "deflate": lambda: _ZlibDecoder(None),
    "br": _BrotliDecoder,
    "zstd": _ZstdDecoder,
}


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A decoder for a Content-Encoding value; None for none (or identity). ValueError: one this relay cannot
    decode (several codings stacked among them)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in _DECODERS:
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    return _DECODERS[encoding]()


def decode_bounded(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``data`` decoded; ValueError when the coding is unsupported, the data is corrupt or truncated, or it
    decodes to more than ``limit`` bytes (decoding stops there)."""
    decoder = decoder_for(content_encoding)
    if decoder is None:
        return data
    out = bytearray()
    try:
        for piece in decoder.feed(data):
            out += piece
            if len(out) > limit:
                raise ValueError(f"decodes to more than {limit} bytes")
    except (zlib.error, brotli.error, zstandard.ZstdError) as e:
        raise ValueError(f"corrupt {content_encoding} data: {e}") from None
    if not decoder.finished:
        raise ValueError(f"truncated {content_encoding} data")
    return bytes(out)
