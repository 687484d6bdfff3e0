"""Debian's HAProxy in front of relays with the shipped configuration (examples/haproxy.cfg, shown in
docs/several-relays.md), for the fleet tests and the streams benchmark's two-relay row."""

from __future__ import annotations

import re
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from tests.support.ports import accepts, free_port

HAPROXY = Path("/usr/sbin/haproxy")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "haproxy.cfg"


def haproxy_config(port: int, relay_ports: list[int]) -> str:
    """The shipped example's configuration (docs/several-relays.md), with these ports."""
    text = EXAMPLE.read_text()
    text = text.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{port}")
    for default, actual in zip((8001, 8002), relay_ports, strict=True):
        text = re.sub(rf"127\.0\.0\.1:{default}\b", f"127.0.0.1:{actual}", text)
    return text


def start_haproxy(stack: ExitStack, relay_ports: list[int], workdir: Path) -> tuple[int, int]:
    """HAProxy in front of two relays, stopped when ``stack`` closes: (port, pid)."""
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(haproxy_config(port, relay_ports))
    log = (workdir / "haproxy.log").open("w")  # a file, not a pipe nobody reads: it cannot block HAProxy
    stack.callback(log.close)
    proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    stack.callback(stop)
    deadline = time.monotonic() + 10
    while not accepts(port):  # it listens, or it exits with its reason in the log
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not start: {(workdir / 'haproxy.log').read_text()[-500:]}")
        time.sleep(0.05)
    return port, proc.pid
