"""The test harness, shared by the tests and the benchmarks (``bench`` imports it; it imports neither).

Real processes (``relayproc``: a real ``mitmdump`` with the addon, forked from a warm interpreter by ``warm``;
``haproxy``), fake upstreams (``fakeupstream``: an LLM API over HTTP, ``wsupstream``: over WebSocket,
``fakestats``: a provider's stats API), and the helpers several test modules share. A test module imports
from here, never from another test module (tests/test_layers.py).
"""
