"""Responses over WebSocket load for the ``ws`` bench: a fake node and a load generator, each its own process.

The C tools of ``bench/tools`` speak HTTP only, so these are Python (``websockets``); they run as processes of
their own, and the bench charges the proxies only with the proxies' CPU (``tests.support.procstat``), never theirs.

``python -m bench.wsload serve``: a node on 127.0.0.1 answering each ``response.create`` with
``response.created``, ``deltas`` text deltas and ``response.completed`` with usage; prints ``listening on PORT``.

``python -m bench.wsload load PORT SOCKETS TURNS INPUT_BYTES [--checkpoints K,…] [--hold] [--key KEY]``:
SOCKETS sockets to ``/v1/responses``, each running TURNS turns back to back (a create with about INPUT_BYTES of
input, then the node's events up to ``response.completed``). After each checkpoint turn count (every socket
there) it prints ``{"at": K}`` and waits for a line on stdin, so the bench samples memory with the sockets open
and idle; ``--hold`` does the same once all turns are done. With ``--live`` (TURNS 0: until stopped) it answers
every line on stdin with ``{"messages": M}`` (so far) at once, so the bench reads the count in the same instant as
a proxy's CPU; on ``stop`` (or end of input) each socket ends its running turn and closes. Last it prints one
JSON object: ``turns``, ``messages`` (both directions), ``errors``, ``wall_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

WORDS = ("def", "return", "self", "import", "class", "value", "result", "for", "in", "if", "else", "None",
         "print", "the", "file", "path", "line", "error", "test", "data", "config", "node", "relay", "call")


def input_text(size: int, seed: int) -> str:
    """About ``size`` characters of code-like text (compressible as prompts are, not a repeated block)."""
    rnd = random.Random(seed)
    out, n = [], 0
    while n < size:
        w = rnd.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


async def _serve(deltas: int) -> None:
    async def handle(ws: ServerConnection) -> None:
        n = 0
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") != "response.create":
                continue
            n += 1
            resp = {"id": f"resp_{n}", "object": "response", "model": msg.get("model"), "status": "in_progress"}
            await ws.send(json.dumps({"type": "response.created", "sequence_number": 0, "response": resp}))
            for k in range(deltas):
                await ws.send(json.dumps({"type": "response.output_text.delta", "sequence_number": k + 1,
                                          "item_id": "m", "output_index": 0, "content_index": 0,
                                          "delta": f"w{k} ", "logprobs": []}))
            usage = {"input_tokens": len(raw) // 4, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": deltas, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": len(raw) // 4 + deltas}
            await ws.send(json.dumps({"type": "response.completed", "sequence_number": deltas + 1,
                                      "response": {**resp, "status": "completed", "usage": usage}}))

    async with serve(handle, "127.0.0.1", 0, max_size=None) as server:
        print(f"listening on {next(iter(server.sockets)).getsockname()[1]}", flush=True)
        await asyncio.Future()


class _Load:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.messages = self.errors = self.turns = 0
        self.checkpoints = sorted({int(k) for k in a.checkpoints.split(",") if k} | ({a.turns} if a.hold else set()))
        # every socket waits at each checkpoint until the bench says go
        self.reached = {k: 0 for k in self.checkpoints}
        self.go = {k: asyncio.Event() for k in self.checkpoints}
        self.stopped = asyncio.Event()  # --live: end each socket after its running turn

    async def socket(self, i: int) -> None:
        a = self.a
        headers = {"Authorization": f"Bearer {a.key}"}
        try:
            async with connect(f"ws://127.0.0.1:{a.port}/v1/responses", additional_headers=headers,
                               max_size=None, open_timeout=60) as ws:
                t = 0
                while (t < a.turns or not a.turns) and not self.stopped.is_set():
                    t += 1
                    body = {"type": "response.create", "model": "gpt-5-codex",
                            "input": input_text(a.input_bytes, i * 100_003 + t)}
                    await ws.send(json.dumps(body))
                    self.messages += 1
                    while True:
                        event = json.loads(await ws.recv())
                        self.messages += 1
                        if event.get("type") in ("response.completed", "error"):
                            self.errors += event["type"] == "error"
                            break
                    self.turns += 1
                    if t in self.go:
                        self.reached[t] += 1
                        await self.go[t].wait()
        except Exception as e:  # noqa: BLE001 - a failed socket is counted, the run goes on
            print(f"socket {i}: {e!r}", file=sys.stderr)
            self.errors += 1
            for k in self.checkpoints:  # it will not reach the rest
                self.reached[k] += 1

    async def answer_counts(self, loop: asyncio.AbstractEventLoop) -> None:
        """--live: a count per line on stdin, until ``stop`` or its end."""
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("stop", ""):
            print(json.dumps({"messages": self.messages}), flush=True)
        self.stopped.set()

    async def run(self) -> None:
        start = time.monotonic()
        tasks = [asyncio.create_task(self.socket(i)) for i in range(self.a.sockets)]
        loop = asyncio.get_running_loop()
        if self.a.live:
            await self.answer_counts(loop)
        for k in self.checkpoints:
            while self.reached[k] < self.a.sockets:
                await asyncio.sleep(0.01)
            print(json.dumps({"at": k}), flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            self.go[k].set()
        await asyncio.gather(*tasks)
        print(json.dumps({"turns": self.turns, "messages": self.messages, "errors": self.errors,
                          "wall_s": round(time.monotonic() - start, 3)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wsload", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--deltas", type=int, default=5)
    g = sub.add_parser("load")
    g.add_argument("port", type=int)
    g.add_argument("sockets", type=int)
    g.add_argument("turns", type=int)
    g.add_argument("input_bytes", type=int)
    g.add_argument("--checkpoints", default="")
    g.add_argument("--hold", action="store_true")
    g.add_argument("--live", action="store_true")
    g.add_argument("--key", default="bench")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        asyncio.run(_serve(a.deltas))
    else:
        asyncio.run(_Load(a).run())


if __name__ == "__main__":
    main()
