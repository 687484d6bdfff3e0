"""Warm starts: relays forked from one interpreter that has already imported mitmproxy and the libraries.

Two thirds of the CPU a relay's start and stop costs are mitmproxy's imports. A test that restarts the
relay many times forks each relay from a warm process (``Zygote``) instead: every relay is still its own
process (own session, pid, output, exit code, SIGTERM/SIGKILL) running mitmdump's own ``main`` from
argument parsing through script loading, serving and shutdown; only the already imported modules are shared.

``python -m tests.support.warm FD``: the zygote itself, serving fork requests on the SOCK_SEQPACKET socket FD.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, NoReturn

# What every relay imports before it listens: mitmproxy's dump tool and the store's libraries.
WARM_MODULES = ("mitmproxy.tools.main", "mitmproxy.tools.dump", "mitmproxy.tools.cmdline", "sqlalchemy",
                "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.mysql", "pymysql", "alembic.command",
                "alembic.config", "alembic.runtime.migration", "alembic.script",
                # what a relay forked from these still imported at its start (the price data store.prices loads
                # lazily, the IDNA codec): ~20 ms of CPU each time
                "genai_prices.data", "genai_prices.data_units", "genai_prices.decompose", "genai_prices.validation",
                "encodings.idna")


class WarmProcess:
    """The subset of ``subprocess.Popen`` that ``RelayProcess`` uses, for a process forked by the zygote."""

    def __init__(self, pid: int, stdout: IO[str], exited: threading.Event, code: list[int]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._exited = exited
        self._code = code

    def poll(self) -> int | None:
        if self._exited.is_set():
            self.returncode = self._code[0]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.poll()  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # As Popen does: it may have ended after poll, its exit not yet reported by the zygote.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Zygote:
    """A warm interpreter that forks relays on request; ``close()`` ends it (relays it forked are left to
    their ``RelayProcess``)."""

    def __init__(self, root: Path) -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.warm", str(theirs.fileno())], cwd=root,
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._lock = threading.Lock()  # one fork request at a time: replies come in order
        self._pids: queue.Queue[int] = queue.Queue()
        self._exits: dict[int, tuple[threading.Event, list[int]]] = {}
        self._reader = threading.Thread(target=self._read, name="zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while msg := self._sock.recv(4096):
            m = json.loads(msg)
            if "pid" in m:  # registered before anyone can wait for it, and before its exit can arrive
                self._exits[m["pid"]] = (threading.Event(), [])
                self._pids.put(m["pid"])
            else:
                event, code = self._exits[m["exit"]]
                code.append(m["code"])
                event.set()

    def popen(self, argv: list[str], cwd: Path, env: dict[str, str]) -> WarmProcess:
        """Fork a ``mitmdump`` (``argv[0]``) with ``argv[1:]``; its output comes back on a pipe."""
        if Path(argv[0]).name != "mitmdump":
            raise ValueError(f"the zygote runs mitmdump only, not {argv[0]}")
        r, w = os.pipe()
        try:
            with self._lock:
                req = json.dumps({"args": argv[1:], "cwd": str(cwd), "env": env}).encode()
                socket.send_fds(self._sock, [req], [w])
                pid = self._pids.get(timeout=30)
        finally:
            os.close(w)
        event, code = self._exits[pid]
        return WarmProcess(pid, open(r, encoding="utf-8", errors="replace"), event, code)  # noqa: SIM115

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)  # both ends see the end: the zygote exits, the reader stops
        self._reader.join(30)
        self._sock.close()
        self.proc.wait(30)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(sock: socket.socket) -> dict | None:
    """Fork on each request; report each child's exit. Returns in a child only, with its request."""
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        waiting: list[socket.socket | int] = [sock, *children]
        ready, _, _ = select.select(waiting, [], [])
        for fd in ready:
            if isinstance(fd, int):  # a child's pidfd, not the socket: the child exited
                pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
                continue
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
            if not msg:
                return None
            req = json.loads(msg)
            pid = os.fork()
            if pid == 0:
                sock.close()
                for pidfd in children:
                    os.close(pidfd)
                req["out"] = fds[0]
                return req
            os.close(fds[0])
            children[os.pidfd_open(pid)] = pid
            sock.send(json.dumps({"pid": pid}).encode())


def _run_mitmdump(req: dict) -> int | None:
    """In the child: become a fresh relay process, then run mitmdump's main as its console script does."""
    os.setsid()  # its own process group, as RelayProcess starts relays: killpg reaches it alone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(req["out"], 1)
    os.dup2(req["out"], 2)
    os.close(req["out"])
    os.close(devnull)
    for stream in (sys.stdout, sys.stderr):  # as PYTHONUNBUFFERED would: the "listening at" line at once
        if isinstance(stream, io.TextIOWrapper):  # as the interpreter made them
            stream.reconfigure(write_through=True, line_buffering=True)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = ["mitmdump", *req["args"]]
    from mitmproxy.tools.main import mitmdump

    return mitmdump(req["args"])


def main() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    # The relay's own modules too (the entry script itself is loaded by mitmproxy, as a script).
    addon = Path(__file__).resolve().parents[2] / "addon"
    for path in sorted(addon.rglob("*.py")):
        module = ".".join(path.relative_to(addon.parent).with_suffix("").parts)
        if path.stem != "__init__" and module != "addon.codex":
            importlib.import_module(module)
    gc.freeze()  # what every relay shares stays out of their collections (and their pages unwritten)
    with contextlib.closing(socket.socket(fileno=int(sys.argv[1]))) as sock:
        req = _serve(sock)
    if req is None:
        return
    code: str | int | None
    try:
        code = _run_mitmdump(req)
    except SystemExit as e:  # mitmproxy's start-up checks exit this way
        code = e.code
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """End a relay as a normal interpreter exit would, less the teardown: freeing everything the zygote had
    imported costs ~0.25 CPU-s per relay and writes to every page it shares with the zygote."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.current_thread():
            thread.join()
    atexit._run_exitfuncs()  # logging's flush among them
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
