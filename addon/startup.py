"""Start-up: problems as one clear line each and a non-zero exit, never a relay that runs half-configured.

mitmproxy logs an ``OptionsError`` raised while a script loads together with its traceback, and its
error check exits non-zero on any error logged during start-up. Two failures it does not catch:
a ``--set`` of one of this script's options that cannot be applied (given twice, or not of the
option's type) makes mitmproxy drop the whole script silently — the process then serves as a bare
proxy with no client auth, routing or masking — and ``--set`` names nobody declared are kept unused.
``StartupCheck``, the script's last addon, finds both, says so, and makes the process exit; until
start-up is over (every addon configured, its ``running`` reached), the ``Gate`` holds every request
(mitmproxy listens before the script's ``running`` hook), and answers them 503 if start-up fails. It also
refuses to start an open relay: one that routes to nodes (the runtime's pool) and listens beyond loopback
without client keys, unless ``codex_allow_open`` says so.
"""

from __future__ import annotations

import asyncio
import difflib
import gc
import logging
import sys
from collections.abc import Iterable

from mitmproxy import ctx, exceptions, optmanager
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from addon.gate import Gate
from addon.guard.target import is_loopback_host
from addon.services.runtime import Runtime

log = logging.getLogger("codex.startup")

_SCRIPT_LOGGER = "mitmproxy.addons.script"


class _OptionErrorsOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, exceptions.OptionsError):
            record.msg, record.args = "%s", (str(error),)
            record.exc_info = record.exc_text = None
        return True


def install_one_line_option_errors() -> None:
    logger = logging.getLogger(_SCRIPT_LOGGER)
    if not any(isinstance(f, _OptionErrorsOneLine) for f in logger.filters):
        logger.addFilter(_OptionErrorsOneLine())


def unknown_options_message(deferred: dict, known: Iterable[str]) -> str | None:
    """What to say about ``--set`` names no addon declared (mitmproxy would ignore them), with the declared
    option each one most likely meant."""
    if not deferred:
        return None
    known = list(known)
    names = []
    for name in sorted(deferred):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        names.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return (f"unknown option(s): {', '.join(names)}; ./run.sh --options (or mitmdump -s addon/codex.py "
            "--options) lists every option with its help")


def take_unusable_options(options: optmanager.OptManager) -> list[str]:
    """Remove the deferred ``--set`` values of declared options that cannot be applied; say why for each.

    Removing them lets the script finish loading (so it can refuse traffic and exit) instead of being
    dropped by mitmproxy. Messages name the option, never its value (it may be a key).
    """
    declared = dict(options.items())
    problems = []
    for name, value in list(options.deferred.items()):
        values = getattr(value, "val", None)  # still the strings given on the command line
        if name not in declared or not isinstance(values, list):
            continue
        if len(values) > 1:
            problems.append(f"{name} is given {len(values)} times: give each option once")
        else:
            o = declared[name]
            scratch = optmanager.OptManager()
            scratch.add_option(name, o.typespec, o.default, o.help, o.choices)
            try:
                scratch.set(*(f"{name}={v}" for v in values))
            except exceptions.OptionsError:
                problems.append(f"{name}: the value given is not a valid {type(o.default).__name__}")
            else:
                continue
        del options.deferred[name]
    return problems


def listen_hosts(modes: Iterable[str], default_host: str) -> list[str]:
    """The hosts the proxy's servers listen on ('' = every interface)."""
    return [ProxyMode.parse(spec).listen_host(default_host) for spec in modes]


def open_relay_problem(*, routes: bool, client_keys: bool, hosts: Iterable[str], allow_open: bool) -> str | None:
    """Why a relay must not start: it would lend its node keys to anyone who can reach it."""
    exposed = [h or "*" for h in hosts if not is_loopback_host(h)]
    if not routes or client_keys or allow_open or not exposed:
        return None
    return (f"refusing to start: the relay routes to nodes and listens on {', '.join(exposed)} with no "
            "codex_client_keys, so anyone who reaches it spends your node keys; set codex_client_keys, "
            "listen on 127.0.0.1 (--listen-host), or set codex_allow_open=true")


def startup_summary(*, reverse_addrs: Iterable[tuple[str, int]], proxy_addrs: Iterable[tuple[str, int]],
                    database: str | None, nodes: Iterable[str], client_keys: bool, admin_token: bool) -> str:
    """The one line a newcomer needs after start-up: where clients and the admin page are, and what runs."""
    def url(addr: tuple[str, int]) -> str:
        host = addr[0] if addr[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{addr[1]}"

    parts = []
    for addr in dict.fromkeys(reverse_addrs):  # a server may list one address twice (IPv4 and dual-stack)
        parts.append(f"clients: {url(addr)}/v1 (OpenAI base URL; Anthropic clients: {url(addr)}), "
                     f"admin page: {url(addr)}/admin{' (codex_admin_token)' if admin_token else ''}")
    parts += [f"proxy clients: {url(addr)} (HTTP proxy)" for addr in dict.fromkeys(proxy_addrs)]
    nodes = list(nodes)
    parts.append(f"nodes: {', '.join(nodes)}" if nodes else "no node: monitor mode, traffic passes through")
    parts.append(f"client keys: {'on' if client_keys else 'off (anyone who reaches the port may call)'}")
    parts.append(f"database: {database or 'none'}")
    return "codex-relay ready; " + "; ".join(parts)


def fatal(message: str) -> None:
    """Log ``message`` as an error and end the process non-zero.

    Errors logged during start-up end mitmdump through its error check; a script that mitmproxy loads
    after that check has run is ended here.
    """
    log.error(message)
    asyncio.get_running_loop().call_soon(sys.exit, 1)


class StartupCheck:
    """The script's last addon: opens the gate once every addon before it has been configured."""

    def __init__(self, gate: Gate, runtime: Runtime) -> None:
        self.gate = gate
        self.runtime = runtime
        self.problems: list[str] = []
        self.configured = False
        self.started = False

    def load(self, loader) -> None:
        loader.add_option("codex_allow_open", bool, False,
                          "Allow a relay that routes to nodes to listen beyond loopback without "
                          "codex_client_keys (anyone who reaches it spends the node keys). Off: such a relay "
                          "refuses to start.")
        install_one_line_option_errors()
        # Every addon of the script has declared its options by now; mitmproxy applies the deferred
        # values right after this hook, and one it cannot apply would drop the script.
        self.problems = take_unusable_options(ctx.options)
        for problem in self.problems:
            log.error(problem)

    def configure(self, updated: set[str]) -> None:
        # Configure runs in chain order: reaching this addon means every one before it accepted its options.
        self.configured = True
        if not self.problems and self.started:
            self.gate.ready = True  # options changed at run time (mitmweb): every addon took them

    def _summary(self) -> str:
        opts = ctx.options
        proxyserver = ctx.master.addons.get("proxyserver")
        reverse: list[tuple[str, int]] = []
        proxy: list[tuple[str, int]] = []
        for server in proxyserver.servers if proxyserver is not None else ():
            (reverse if isinstance(server.mode, ReverseMode) else proxy).extend(server.listen_addrs)
        return startup_summary(reverse_addrs=reverse, proxy_addrs=proxy, database=self.runtime.db.database,
                               nodes=[n.id for n in self.runtime.pool],
                               client_keys=self.runtime.keys.enabled,
                               admin_token=bool(opts.codex_admin_token))

    def running(self) -> None:
        # The proxy listens before any addon's ``running`` hook: the gate opens here, at the end of start-up,
        # never earlier, so a request that arrives meanwhile waits for it, never meets a half-started relay.
        self.started = True
        opts = ctx.options
        for problem in (unknown_options_message(opts.deferred, (name for name, _ in opts.items())),
                        open_relay_problem(routes=len(self.runtime.pool) > 0,
                                           client_keys=self.runtime.keys.enabled,
                                           hosts=listen_hosts(opts.mode, opts.listen_host),
                                           allow_open=opts.codex_allow_open)):
            if problem:
                self.problems.append(problem)
        if self.problems or not self.configured:
            self.gate.settle(False)
            fatal("; ".join(self.problems) or "the relay's configuration did not complete")
            return
        self.gate.settle(True)
        log.info(self._summary())
        # Start-up is over: what it loaded (modules, the price data, the schema) lives as long as the
        # process. Frozen, it is no longer walked by every full garbage collection (~90 ms each, every
        # few thousand calls, during which no connection moves).
        gc.freeze()
