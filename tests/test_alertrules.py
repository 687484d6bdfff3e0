"""Alert decisions, as plain functions with a fake clock: which format and model pattern no node in rotation
can serve, and when a change is told (bad news always, good news held back while a subject flaps)."""

from __future__ import annotations

from addon.observe.alertrules import NodeStatus, Watch, all_nodes_watch, due, node_watches, told
from store.alertstate import Announced
from store.records import NodeConfig


def node(node_id: str, failed: bool = False, formats: tuple[str, ...] = (), models: tuple[str, ...] = (),
         model_map: dict[str, str] | None = None, routable: bool = True) -> NodeStatus:
    return NodeStatus(NodeConfig(node_id, "http://127.0.0.1:9/v1", "k", formats=formats, models=models,
                                 model_map=model_map or {}), failed, routable)


def groups(nodes: list[NodeStatus]) -> dict[str, tuple[bool, str]]:
    """The format and model pattern watches: subject → (down, message)."""
    return {w.subject: (w.down, w.message) for w in node_watches(nodes) if w.key.startswith("serves:")}


def test_the_models_of_a_team_unserved_while_a_node_for_other_models_is_up():
    # The operator's outage: both nodes for claude-* failed, the node for OpenAI models up. Not every node is
    # down, yet no call for a claude model can be served.
    nodes = [node("gpt", formats=("openai",)), node("claude-a", True, ("anthropic",), ("claude-*",)),
             node("claude-b", True, ("anthropic",), ("claude-*",))]
    assert groups(nodes) == {
        "openai *": (False, "openai calls for models * have a node in rotation again"),
        "anthropic claude-*": (True, "no node can serve anthropic calls for models claude-*: claude-a, claude-b "
                                     "are failed")}
    assert all_nodes_watch(nodes, {}) is not None and not all_nodes_watch(nodes, {}).down
    # One of them back: served again.
    nodes[1] = node("claude-a", False, ("anthropic",), ("claude-*",))
    assert groups(nodes)["anthropic claude-*"][0] is False


def test_a_pattern_is_served_by_every_node_whose_globs_cover_it():
    # A catch-all node serves claude-* too; the claude node does not serve every model.
    nodes = [node("any"), node("claude", True, models=("claude-*",))]
    assert groups(nodes) == {"any *": (False, "calls for models * have a node in rotation again")}
    nodes = [node("any", True), node("claude", models=("claude-*",))]
    assert groups(nodes) == {"any *": (True, "no node can serve calls for models *: any is failed")}
    # model_map names are patterns of their own: gpt-x only the mapping node serves.
    nodes = [node("map", True, models=("claude-*",), model_map={"gpt-x": "claude-x"}), node("claude",
                                                                                              models=("claude-*",))]
    assert groups(nodes) == {"any gpt-x": (True, "no node can serve calls for models gpt-x: map is failed")}


def test_a_group_every_routable_node_serves_is_left_to_all_nodes_down():
    nodes = [node("a", True), node("b", True), node("off", True, models=("x",), routable=False)]
    assert groups(nodes) == {}  # the disabled node neither serves nor makes a group
    every = all_nodes_watch(nodes, {})
    assert every is not None and (every.event, every.message) == ("all_nodes_down", "all 2 routable nodes are failed")


def test_only_the_api_formats_without_a_node_are_named():
    nodes = [node("resp", formats=("responses",)), node("oa", True, formats=("openai",))]
    down, message = groups(nodes)["openai *"]
    assert down and message == ("no node can serve openai calls (chat, completions, embeddings, images) for models *: "
                                "oa is failed")
    assert "responses *" not in groups(nodes)  # both nodes serve it: only all_nodes_down can say it


def test_bad_news_always_good_news_held_while_flapping():
    told_of: dict[str, Announced] = {}

    def tell(down: bool, now: float) -> bool:
        watch = Watch("node:a", "a", down, "node_failed" if down else "node_recovered", "")
        last = told_of.get(watch.key)
        if not due(watch, last, now, hold=300):
            return False
        told_of[watch.key] = told(watch, last, 0, now)
        return True

    assert not tell(False, 0)  # up, never told otherwise: nothing
    assert tell(True, 10)  # failed
    assert tell(False, 20)  # back
    assert tell(True, 30)  # failed again within the hold: told
    assert not tell(False, 40)  # back again within the hold after the last recovery: held
    assert not tell(True, 50)  # failed again: what was told last, nothing to tell
    assert not tell(False, 60) and not tell(False, 319)
    assert tell(False, 320)  # the hold is over: the state now is told
    assert not tell(False, 330)


def test_every_node_down_ends_once_a_recovery_was_told():
    down = [node("a", True), node("b", True)]
    one_back = [node("a"), node("b", True)]
    assert all_nodes_watch(one_back, {"node:a": Announced(True, 0), "node:b": Announced(True, 0)}) is None
    end = all_nodes_watch(one_back, {"node:a": Announced(False, 0), "node:b": Announced(True, 0)})
    assert end is not None and (end.down, end.event) == (False, None)  # recorded, nothing sent
    assert all_nodes_watch(down, {}).down  # type: ignore[union-attr]
