"""The services the addons share (plain Python: no mitmproxy).

Each service owns one part of what the relay runs on — the stats database, the fleet of nodes, their health
checks, the provider poller, alerts, prices, the client keys — and parses its options once into a frozen
settings object (``*_settings(options)``, raising ``SettingsError`` with the option's name), which the
service puts to use (``apply``; the database's ``open`` and ``prune``). ``addon.serviceoptions`` declares
the options to mitmproxy and calls these; ``addon.services.runtime.Runtime`` builds the services, wires them
together and stops them in one loop.
"""
