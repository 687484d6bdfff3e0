"""The addon chain: the relay's addons as one for mitmproxy, their hooks run in order as mitmproxy would."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.test import taddons

from addon.chain import AddonChain


class Sync:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.tag = log, name

    def load(self, loader) -> None:
        loader.add_option(f"chain_test_{self.tag}", int, 0, "an option of a chained addon")

    def request(self, flow: object) -> None:
        self.log.append(f"{self.tag} {flow}")


class Async(Sync):
    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)  # a real suspension: the next hook must still wait for it
        self.log.append(f"{self.tag} {flow}")


class Nested:
    def __init__(self, log: list[str]) -> None:
        self.addons = [Sync(log, "nested")]


def test_hooks_run_in_the_addons_order_each_awaited_before_the_next():
    log: list[str] = []
    chain = AddonChain([Sync(log, "a"), Async(log, "b"), Sync(log, "c"), Nested(log)])
    asyncio.run(chain.request("f"))
    assert log == ["a f", "b f", "c f", "nested f"]


def test_one_addons_hook_is_handed_to_mitmproxy_as_it_is():
    log: list[str] = []
    only = Sync(log, "a")
    chain = AddonChain([only, object()])
    assert chain.request == only.request
    assert chain.request("f") is None and log == ["a f"]
    assert not hasattr(chain, "response") and not hasattr(chain, "addons")  # mitmproxy sees no sub-addons


def test_an_exception_ends_the_event_for_the_rest_of_the_chain():
    log: list[str] = []

    class Boom:
        def request(self, flow: object) -> None:
            raise RuntimeError("boom")

    chain = AddonChain([Sync(log, "a"), Boom(), Sync(log, "c")])
    with pytest.raises(RuntimeError):
        chain.request("f")
    assert log == ["a f"]


def test_mitmproxy_loads_and_dispatches_to_every_chained_addon():
    log: list[str] = []
    chain = AddonChain([Sync(log, "a"), Async(log, "b")])
    with taddons.context(chain) as tctx:
        assert {"chain_test_a", "chain_test_b"} <= set(tctx.options.keys())
        asyncio.run(tctx.master.addons.trigger_event(hooks.all_hooks["request"]("f")))
    assert log == ["a f", "b f"]


def test_a_chained_async_hook_is_refused_where_mitmproxy_cannot_await_as_it_would_be_alone():
    log: list[str] = []
    chain = AddonChain([Sync(log, "a"), Async(log, "b")])
    with taddons.context(chain) as tctx, pytest.raises(exceptions.AddonManagerError, match="cannot be called"):
        tctx.master.addons.invoke_addon_sync(chain, hooks.all_hooks["request"]("f"))
    assert not inspect.iscoroutinefunction(AddonChain([Sync(log, "a"), Sync(log, "c")]).request)


def test_the_scripts_running_hook_never_yields_to_the_event_loop():
    """mitmproxy listens before its addons' ``running`` hooks and calls the script's before its TLS addon's:
    a script hook that awaits lets requests in before mitmproxy is ready (tests/test_startup.py shows the
    crash that followed)."""
    import importlib

    codex = importlib.import_module("addon.codex")
    (chain,) = codex.addons
    assert callable(chain.running)
    assert not inspect.iscoroutinefunction(chain.running)
