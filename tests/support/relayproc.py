"""Start and stop a real ``mitmdump -s addon/codex.py`` for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.warm import WarmProcess, Zygote

ROOT = Path(__file__).resolve().parents[2]
# "listening at 127.0.0.1:8000", "[::1]:8000", or "*:8000" (every address)
_LISTEN_RE = re.compile(r"listening at (\*|\[?[\d.:a-f]+\]?):(\d+)")

# The zygote that relays of this repository fork from when none is given (the tests set one per worker).
default_zygote: Zygote | None = None


class RelayProcess:
    """One relay process on 127.0.0.1 with a free port; ``stop()`` sends SIGTERM (the flush path).

    ``root``: where ``addon/codex.py`` is (an installed copy, or this repository), also the working directory
    unless ``cwd`` names another.
    ``mode`` replaces the reverse mode (e.g. ``regular``); ``argv`` replaces the whole command (e.g.
    ``./run.sh …``), still read for mitmproxy's "listening at" line. ``zygote``: fork the relay from that
    warm interpreter instead of starting ``mitmdump`` afresh (see tests.support.warm); without one, a plain mitmdump
    relay of this repository forks from ``default_zygote`` when that is set.
    """

    def __init__(self, *, db_url: str | None, options: dict[str, str] | None = None,
                 reverse_target: str = "http://127.0.0.1:9", addon: bool = True,
                 tool: str = "mitmdump", env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None, root: Path = ROOT, mode: str | None = None,
                 argv: list[str] | None = None, zygote: Zygote | None = None, cwd: Path | None = None) -> None:
        self.root = root
        self.db_url = db_url
        self.options = dict(options or {})
        self.reverse_target = reverse_target
        self.addon = addon
        self.tool = tool
        self.env = env
        self.extra_args = list(extra_args or [])
        self.mode = mode or f"reverse:{reverse_target}"
        self.argv = argv
        self.zygote = zygote
        self.cwd = cwd or root
        self.port = 0
        self.listen_host = ""  # as mitmproxy prints it: "*" means every address
        self.proc: subprocess.Popen[str] | WarmProcess | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return list(self.argv)
        cmd = [str(Path(sys.executable).with_name(self.tool)), "--mode", self.mode,
               "--listen-host", "127.0.0.1", "-p", "0"]
        if not self.addon:  # the bare baseline connects as the relay does (the script sets it itself)
            cmd += ["--set", "connection_strategy=lazy"]
        else:
            cmd[1:1] = ["-s", str(self.root / "addon" / "codex.py")]
            if self.db_url:
                cmd += ["--set", f"codex_db={self.db_url}"]
            for k, v in self.options.items():
                cmd += ["--set", f"{k}={v}"]
        return cmd + self.extra_args

    def start(self, timeout: float = 60) -> RelayProcess:
        return self.spawn().ready(timeout)

    def launch(self, timeout: float = 60) -> int | None:
        """Start the process: None once it listens, or its exit code if it exits first."""
        return self.spawn().listening(timeout)

    def spawn(self) -> RelayProcess:
        """Start the process without waiting for it: mitmdump's start-up (mostly imports) takes a second or
        two, so relays that boot side by side, or while another serves, save that time."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        zygote = self.zygote
        if zygote is None and self.argv is None and self.tool == "mitmdump" and self.root == ROOT:
            zygote = default_zygote
        if zygote is not None:
            self.proc = zygote.popen(self.command(), self.cwd, env)
        else:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, cwd=self.cwd, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def ready(self, timeout: float = 60) -> RelayProcess:
        """Wait for a spawned relay to listen; an exit instead is an error."""
        if self.listening(timeout) is not None:
            raise RuntimeError(f"relay did not start listening:\n{self.output()}")
        return self

    def listening(self, timeout: float = 60) -> int | None:
        """Wait for a spawned relay: None once it listens, or its exit code if it exits first."""
        assert self.proc is not None, "spawn() first"
        # The process says when it listens, or exits: either ends the wait.
        if not self._listening.wait(timeout):
            self.kill()
            raise RuntimeError(f"relay did not start listening within {timeout:g} s:\n{self.output()}")
        if self.port:
            return None
        rc = self.proc.wait(30)  # its output has ended: it is exiting
        if self._reader:
            self._reader.join(10)
        return rc

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)
            m = _LISTEN_RE.search(line)
            if m and not self.port:
                self.listen_host, self.port = m.group(1), int(m.group(2))
                self._listening.set()
        self._listening.set()  # exited

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the relay flushes every record before it exits."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self._reader:
            self._reader.join(10)
        return rc

    def kill(self) -> None:
        """SIGKILL: no flush, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> RelayProcess:
        return self.ready() if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
