"""The mitmproxy side of codex-relay: the addons ``addon/codex.py`` loads, and the plain Python they use.

It builds on ``store`` (records, configuration, database); nothing in ``store`` imports it.
"""
