"""Benchmarks (``./run.sh bench``): the relay's overhead against bare mitmdump, the writer, stats queries."""
