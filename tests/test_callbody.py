"""A call's body is read as a node reads it (decoded, one value per key, printable model) or refused."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from addon.guard.callbody import BodyRefused, read_call_body
from addon.metering.usage import RequestInfo

LIMIT = 1 << 20


def test_reads_model_stream_and_cache_key():
    body = json.dumps({"model": "gpt-5-codex", "stream": True, "prompt_cache_key": "conv-9", "input": []}).encode()
    assert read_call_body(body, None, limit=LIMIT) == RequestInfo("gpt-5-codex", True, "conv-9")
    assert read_call_body(b'{"model": "m"}', "identity", limit=LIMIT) == RequestInfo("m", False, None)
    assert read_call_body(b'{"input": "no model"}', None, limit=LIMIT) == RequestInfo(None, False, None)
    # Values of the wrong type mean "not given", as before: the node answers them.
    assert read_call_body(b'{"model": "m", "stream": "true", "prompt_cache_key": {"a": 1}}', None,
                          limit=LIMIT) == RequestInfo("m", False, None)


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("zstd", zstandard.ZstdCompressor().compress), ("GZIP", gzip.compress),
])
def test_a_coded_body_is_read_decoded(encoding, compress):
    body = json.dumps({"model": "gpt-5-codex", "stream": True}).encode()
    assert read_call_body(compress(body), encoding, limit=LIMIT) == RequestInfo("gpt-5-codex", True, None)


@pytest.mark.parametrize("raw, encoding, why", [
    (gzip.compress(b'{"model": "m"}', mtime=0)[:-4], "gzip", "truncated"),
    (b"not gzip at all", "gzip", "corrupt"),
    (b'{"model": "m"}', "compress", "unsupported content-encoding"),
    (b'{"model": "m"}', "gzip, br", "unsupported content-encoding"),
    (gzip.compress(b'{"model": "m", "pad": "' + b"x" * 2 * LIMIT + b'"}', mtime=0), "gzip", "more than"),
], ids=["truncated", "corrupt", "compress", "stacked", "over-the-bound"])
def test_a_body_that_cannot_be_decoded_within_the_bound_is_415(raw, encoding, why):
    with pytest.raises(BodyRefused) as e:
        read_call_body(raw, encoding, limit=LIMIT)
    assert (e.value.status, e.value.code) == (415, "unsupported_content_encoding")
    assert why in e.value.message


@pytest.mark.parametrize("body", [
    b'{"model": "o3", "input": "x", "model": "gpt-5-codex"}',  # which one would the node run?
    b'{"model": "gpt-5", "stream": true, "stream": false}',
    None, b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b"[" * 100_000, b'{"model": "m"} x',
    b'{"model": ""}', b'{"model": 5}', b'{"model": "gpt-5-codex\\ud800"}', b'{"model": "gpt\\u0000"}',
    b'{"model": "gpt-5\\n"}',
])
def test_an_ambiguous_or_invalid_body_is_400(body):
    with pytest.raises(BodyRefused) as e:
        read_call_body(body, None, limit=LIMIT)
    assert (e.value.status, e.value.code) == (400, "invalid_request_body")
