"""The store's command-line tools (``./run.sh stats``, ``poll-stats``, ``reconcile``, ``prune``)."""
