"""The store: records, configuration, schema, writer and every query, below the proxy (no mitmproxy).

``addon`` imports ``store``; ``store`` never imports ``addon``. Command lines live in ``*_cli`` modules.
"""
