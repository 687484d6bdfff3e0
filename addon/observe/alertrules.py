"""What the alerts watch about the nodes, and when a change of it is told.

Plain Python (no mitmproxy, no database). ``node_watches`` turns the nodes' states into subjects, each up
or down: every node, and every API format and model pattern the routable nodes serve (``no_node_serves``
when no node that serves it is in rotation, though other nodes are); ``all_nodes_watch`` every routable
node at once (``all_nodes_down``). ``due`` says whether a subject's state is to be told, given what was
last told of it: bad news always, good news at most once per ``hold`` seconds per subject. A flapping
node so sends its failure, its recovery, its next failure, then nothing until the hold is over, when its
state then is told if it differs: a recovery may be told late, a failure is never left untold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from addon.nodes.modelroute import serves
from store.alertstate import Announced
from store.config import NODE_FORMATS
from store.records import NodeConfig

RELAY = "relay"  # the subject of events about the relay (or every node) as a whole
ANY_FORMAT = "any"  # the format group of a node that names none: it takes every API format
ALL_NODES = "all_nodes"
_API_FORMATS: frozenset[str] = frozenset().union(*NODE_FORMATS.values())
_UP = Announced(False, 0)  # a subject with no record


@dataclass(frozen=True, slots=True)
class NodeStatus:
    config: NodeConfig
    failed: bool
    routable: bool  # enabled and with weight


@dataclass(frozen=True, slots=True)
class Watch:
    """A subject in its current state: ``key`` names it in the ledger, ``subject`` in the payload; ``event``
    is what telling this state sends (None: it is recorded, nothing is sent)."""

    key: str
    subject: str
    down: bool
    event: str | None
    message: str


def due(watch: Watch, last: Announced | None, now: float, hold: float) -> bool:
    """Whether ``watch``'s state is to be told now (no record of a subject: it was last told up)."""
    if not changed(watch, last):
        return False
    if watch.down or watch.event is None or last is None or last.good_at is None:
        return True
    return now - last.good_at >= hold


def changed(watch: Watch, last: Announced | None) -> bool:
    """Whether ``watch``'s state differs from the one last told."""
    return watch.down != (last is not None and last.down)


def told(watch: Watch, last: Announced | None, version: int, now: float) -> Announced:
    """The ledger entry once ``watch``'s state is told, seen at ``version``."""
    good_at = now if not watch.down and watch.event is not None else (last.good_at if last else None)
    return Announced(watch.down, version, good_at)


def node_watches(nodes: Sequence[NodeStatus]) -> list[Watch]:
    """Every node, and every (format, model pattern) group the routable nodes serve."""
    watches = [Watch(f"node:{n.config.id}", n.config.id, n.failed, "node_failed" if n.failed else "node_recovered",
                     f"node {n.config.id} is out of rotation after failing" if n.failed
                     else f"node {n.config.id} is back in rotation") for n in nodes]
    routable = [n for n in nodes if n.routable]
    groups = dict.fromkeys((fmt, pattern) for n in routable for fmt in n.config.formats or (ANY_FORMAT,)
                           for pattern in _patterns(n.config))
    for fmt, pattern in groups:
        watch = _group_watch(fmt, pattern, routable)
        if watch is not None:
            watches.append(watch)
    return watches


def all_nodes_watch(nodes: Sequence[NodeStatus], told_now: Mapping[str, Announced]) -> Watch | None:
    """Every routable node at once, after ``node_watches`` were told (``told_now``). Its end sends nothing (the
    nodes' recoveries say it) and is recorded once a routable node's recovery was told: a flapping node whose
    recovery is held back does not repeat it. None: its end is not to be recorded yet."""
    routable = [n for n in nodes if n.routable]
    if routable and all(n.failed for n in routable):
        return Watch(ALL_NODES, RELAY, True, "all_nodes_down", f"all {len(routable)} routable nodes are failed")
    if not routable or any(not told_now.get(f"node:{n.config.id}", _UP).down for n in routable):
        return Watch(ALL_NODES, RELAY, False, None, "")
    return None


def _patterns(config: NodeConfig) -> tuple[str, ...]:
    """The model patterns a node takes: its ``models`` globs and ``model_map`` names, or every model."""
    return (*config.models, *config.model_map) if config.models else ("*",)


def _group_watch(fmt: str, pattern: str, routable: list[NodeStatus]) -> Watch | None:
    """Whether some API format of ``fmt`` has no node in rotation for models ``pattern``; None when every
    routable node serves the whole group (then ``all_nodes_down`` says the same)."""
    api_formats = sorted(NODE_FORMATS.get(fmt, _API_FORMATS))
    # A pattern is matched as a model name: a node whose glob covers it serves it (a catch-all node serves
    # ``claude-*``, a ``claude-*`` node does not serve ``*``); a node serves its own patterns.
    servers = {af: [n for n in routable if serves(n.config, af, pattern)
                    or (pattern in n.config.models and af in _node_api_formats(n.config))] for af in api_formats}
    if all(len(s) == len(routable) for s in servers.values()):
        return None
    unserved = [af for af in api_formats if all(n.failed for n in servers[af])]
    calls = "calls" if fmt == ANY_FORMAT else f"{fmt} calls"
    subject = f"{fmt} {pattern}"
    if not unserved:
        return Watch(f"serves:{subject}", subject, False, "serving_again",
                     f"{calls} for models {pattern} have a node in rotation again")
    failed = sorted({n.config.id for af in unserved for n in servers[af]})
    which = "" if len(unserved) == len(api_formats) else f" ({', '.join(unserved)})"
    return Watch(f"serves:{subject}", subject, True, "no_node_serves",
                 f"no node can serve {calls}{which} for models {pattern}: {', '.join(failed)} "
                 f"{'is' if len(failed) == 1 else 'are'} failed")


def _node_api_formats(config: NodeConfig) -> frozenset[str]:
    return frozenset().union(*(NODE_FORMATS[f] for f in config.formats)) if config.formats else _API_FORMATS
