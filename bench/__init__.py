"""Benchmarks (``./run.sh bench``): the relay's overhead against bare mitmdump, the writer, stats queries.

The real processes they drive (``relayproc``: a real ``mitmdump`` with the addon; ``fakeupstream``: a fake LLM
API) are the test harness's, imported from ``tests.support``; ``bench`` imports nothing else of ``tests``.
"""
