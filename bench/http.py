"""Relay overhead: direct to the upstream vs bare mitmdump vs the relay (SQLite, MariaDB), side by side."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.load import run_load
from tests.relayproc import ROOT, RelayProcess


def start_upstream(stack: ExitStack, *args: str) -> int:
    """The fake upstream in its own process, so it does not share a GIL with the load generator."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeupstream", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    stack.callback(lambda: (proc.kill(), proc.wait(10)))
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening on "):
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    return int(line.split()[-1])


def targets(stack: ExitStack, upstream_port: int, mysql_url: str | None) -> dict[str, int]:
    """name -> port of each thing under test, all started and registered for stopping."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codex-bench-")))
    nodes = tmp / "nodes.toml"
    nodes.write_text(f'[[nodes]]\nid = "bench"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
                     'api_key = "k"\nweight = 1\n')
    reverse = f"http://127.0.0.1:{upstream_port}"
    # Printing every flow costs mitmdump more than anything else here: off for all targets alike.
    quiet = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    relay_opts = {"codex_nodes": str(nodes), "codex_ping_interval": "0"}
    out = {"direct": upstream_port}
    bare = RelayProcess(db_url=None, addon=False, reverse_target=reverse, extra_args=quiet)
    out["mitmdump"] = stack.enter_context(bare).port
    relay = RelayProcess(db_url=f"sqlite:///{tmp / 'bench.db'}", reverse_target=reverse,
                         options=relay_opts, extra_args=quiet)
    out["relay-sqlite"] = stack.enter_context(relay).port
    if mysql_url:
        relay_my = RelayProcess(db_url=mysql_url, reverse_target=reverse, options=relay_opts, extra_args=quiet)
        out["relay-mariadb"] = stack.enter_context(relay_my).port
    return out


def bench_http(*, seconds: float, clients: list[int], rounds: int, mysql_url: str | None,
               ttfb_delay: float, ttfb_requests: int) -> dict:
    results: dict = {"throughput": [], "ttfb": []}
    with ExitStack() as stack:
        ports = targets(stack, start_upstream(stack), mysql_url)
        for port in ports.values():  # warm-up: connections, imports, first DB writes
            run_load(port, clients=4, seconds=0.5)
        for c in clients:
            for r in range(rounds):
                # Interleaved so drift on a shared machine hits every target alike.
                for name, port in ports.items():
                    res = run_load(port, clients=c, seconds=seconds).summary()
                    results["throughput"].append({"target": name, "round": r, **res})
                    print(f"  {name:14} clients={c:<3} round={r} {res['rps']:>8} req/s  "
                          f"median {res['latency_median_ms']} ms  p99 {res['latency_p99_ms']} ms", flush=True)
    with ExitStack() as stack:
        port = start_upstream(stack, "--first-byte-delay", str(ttfb_delay))
        ports = targets(stack, port, None)
        for p in ports.values():
            run_load(p, clients=1, seconds=5, max_requests=3)
        for name, p in ports.items():
            res = run_load(p, clients=1, seconds=600, max_requests=ttfb_requests).summary()
            results["ttfb"].append({"target": name, "first_event_delay_ms": ttfb_delay * 1000, **res})
            print(f"  {name:14} TTFB median {res['ttfb_median_ms']} ms (upstream delay {ttfb_delay * 1000:g} ms)",
                  flush=True)
    return results
