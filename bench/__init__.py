"""Benchmarks (``./run.sh bench``): the relay's overhead against bare mitmdump, the writer, stats queries.

Also home of the real-process helpers both the benchmarks and the end-to-end tests drive
(``relayproc``: a real ``mitmdump`` with the addon; ``fakeupstream``: a fake LLM API): ``tests``
imports ``bench``, never the other way round.
"""
