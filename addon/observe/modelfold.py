"""The ``model`` label of the Prometheus series, folded so that its values stay few whatever clients send.

A model that matches one of the nodes' ``models`` globs is labelled with that glob (the first, in sorted
order); the first ``TOP_N`` other models this process sees keep their own name; every later one is
``other``, and a call that named none is ``none``. So a family has at most (globs + ``TOP_N`` + 2) model
values per node or key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

TOP_N = 20
OTHER, NONE = "other", "none"


class ModelFold:
    """Folds a model name to its label; ``patterns`` gives the configured globs (read on each call: the
    nodes change at runtime, and a label already given stays)."""

    def __init__(self, patterns: Callable[[], Iterable[str]], top_n: int = TOP_N) -> None:
        self._patterns = patterns
        self._top_n = top_n
        self._seen: dict[str, str] = {}  # model -> its label, once given
        self._named = 0  # models labelled with their own name

    def label(self, model: str | None) -> str:
        if not model:
            return NONE
        label = self._seen.get(model)
        if label is not None:
            return label
        label = next((g for g in sorted(set(self._patterns())) if fnmatchcase(model, g)), None)
        if label is None:
            if self._named < self._top_n:
                self._named += 1
                label = model
            else:
                label = OTHER
        if len(self._seen) < 10_000:  # the cache too stays bounded against a client inventing names
            self._seen[model] = label
        return label
