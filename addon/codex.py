"""Entry script: ``mitmdump -s addon/codex.py`` loads the codex-relay addons."""

import sys
from pathlib import Path

# mitmproxy puts this script's folder on sys.path; the packages live one level up.
_root = str(Path(__file__).resolve().parent.parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

from addon.relay import Relay  # noqa: E402

addons = [Relay()]
