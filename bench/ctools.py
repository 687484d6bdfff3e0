"""The streams part's load tools, ``bench/tools/fakeup.c`` and ``loadgen.c``: compiled on first use with
``cc -O2`` into ``bench/tools/.build/`` (git ignores it), one binary per source hash so an edit rebuilds.

They are C (epoll, one thread) so that on a 2-core machine the upstream and the load generator cost almost
nothing next to the proxy being measured; a Python load generator would take a core away from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / "tools"
BUILD = TOOLS / ".build"


class ToolError(RuntimeError):
    """The load tools cannot be built: bench reports it as one line."""


def binary(name: str) -> Path:
    """``bench/tools/<name>.c`` compiled, built now if this version of the source has no binary yet."""
    source = TOOLS / f"{name}.c"
    out = BUILD / f"{name}-{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"
    if out.exists():
        return out
    cc = shutil.which("cc")
    if cc is None:
        raise ToolError(f"no C compiler: the streams part builds {source.relative_to(TOOLS.parent.parent)} "
                        "with `cc -O2` (install gcc or clang)")
    BUILD.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # renamed when whole: a concurrent run never sees half a binary
    done = subprocess.run([cc, "-O2", "-o", str(tmp), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolError(f"cc -O2 {source.name} failed: {' '.join(done.stderr.split())[:300]}")
    tmp.replace(out)
    return out


def start_fakeup(stack: ExitStack) -> int:
    """The fake upstream on a free port, stopped when ``stack`` closes; its port."""
    return start_listener(stack, [str(binary("fakeup")), "0"])


def start_listener(stack: ExitStack, argv: list[str], cwd: Path | None = None) -> int:
    """A server process that prints "listening on … PORT" first (fakeup, tests.support.fakeupstream), killed when
    ``stack`` closes; its port."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        proc.kill()
        proc.wait(10)

    stack.callback(stop)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening on "):
        raise RuntimeError(f"{Path(argv[0]).name} {' '.join(argv[1:])} did not start: {line!r}")
    return int(line.split()[-1])


@dataclass(frozen=True)
class Load:
    """One loadgen run: ``conns`` connections started evenly over ``ramp_ms``, ``calls`` calls each; every
    call asks the upstream for ``n`` delta events ``ms`` apart, or (``json_bytes`` > 0) one JSON body."""
    conns: int
    calls: int
    n: int = 300
    ms: int = 5
    json_bytes: int = 0
    ramp_ms: int = 0

    def argv(self, port: int) -> list[str]:
        return [str(binary("loadgen")), str(port), *(str(v) for v in (self.conns, self.calls, self.n, self.ms,
                                                                          self.json_bytes, self.ramp_ms))]


def loadgen(port: int, load: Load) -> dict:
    """Run ``load`` against ``port`` to its end: loadgen's JSON (calls_ok, errors, events, wall_s,
    events_per_s, ttfb/lat/gap/dur percentiles in ms)."""
    return loadgen_result(loadgen_start(port, load))


def loadgen_start(port: int, load: Load) -> subprocess.Popen[str]:
    """``load`` in the background; ``loadgen_result`` collects it."""
    return subprocess.Popen(load.argv(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loadgen_result(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.strip()}")
    # loadgen prints -1 for a percentile of no samples (a JSON call has no events): None here
    return {k: None if isinstance(v, float) and v < 0 else v for k, v in json.loads(out).items()}
