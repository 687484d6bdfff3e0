"""Entry script: ``mitmdump -s addon/codex.py`` loads the codex-relay addons."""

import logging
import sys
from pathlib import Path

# Alembic narrates its plugins and every migration step at INFO, some of it at import time.
logging.getLogger("alembic").setLevel(logging.WARNING)

# mitmproxy puts this script's folder on sys.path; the packages live one level up.
_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from addon.admin import Admin  # noqa: E402
from addon.auth import ClientAuth  # noqa: E402
from addon.chain import AddonChain  # noqa: E402
from addon.dispatch import HookCache  # noqa: E402
from addon.drain import Drain  # noqa: E402
from addon.gate import EgressCheck, Gate  # noqa: E402
from addon.hygiene import KeyHygiene  # noqa: E402
from addon.keyinfo import KeyInfo  # noqa: E402
from addon.limits import Limits  # noqa: E402
from addon.ownbody import OwnBodies  # noqa: E402
from addon.refusal import RefusalSink  # noqa: E402
from addon.relay import Relay  # noqa: E402
from addon.serviceoptions import LimitOptions, RuntimeOptions  # noqa: E402
from addon.services.runtime import Runtime  # noqa: E402
from addon.sseview import SSEView  # noqa: E402
from addon.startup import StartupCheck  # noqa: E402
from addon.userstats import UserStats  # noqa: E402

# Order matters: the drain sees every request first (SIGTERM waits for them all), then the gate
# (nothing before the script is configured, canonical targets only),
# the runtime's services before the addons that use them (configure runs in chain order), client auth before
# anything reads the body, the egress check after every other request hook, and the start-up check
# last (its load and configure run after every other addon's).
refusals = RefusalSink()
drain = Drain()
gate = Gate(refusals, drain.is_draining)  # the health check fails once SIGTERM came
runtime = Runtime()  # the services: stats database, fleet, health checks, providers, alerts, prices, client keys
limits = Limits(runtime)  # client keys' limits: enforced by Relay
own = OwnBodies(refusals, runtime.keys)  # the own endpoints' bodies: read around them (own.handover after them)
# One addon for mitmproxy to dispatch to (addon.chain): walking eleven for every event, and calling each
# hook apart, cost ~25 µs of a short call.
addons = [AddonChain([refusals, drain, gate, RuntimeOptions(runtime), LimitOptions(limits),
                      ClientAuth(refusals, runtime.keys), own, Admin(runtime, limits), UserStats(runtime),
                      KeyInfo(runtime, limits), own.handover, Relay(runtime, refusals, runtime.secrets, limits),
                      KeyHygiene(), SSEView(), EgressCheck(), HookCache(), StartupCheck(gate, runtime)])]
