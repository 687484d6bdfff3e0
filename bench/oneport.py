"""``python -m bench.oneport <mitmdump arguments>``: mitmdump whose listening sockets set SO_REUSEPORT.

For the streams benchmark's fleet row only: several such processes listen on one port and the kernel
spreads the connections among them, so two relays are measured with no balancer process beside them,
which on a small machine shows how much of it the load tools leave the relays. mitmproxy has no option
for this (it listens through ``asyncio.start_server``), hence the wrapper; it is not a way to deploy.
"""

from __future__ import annotations

import asyncio
import functools
import sys

from mitmproxy.tools.main import mitmdump

if __name__ == "__main__":
    asyncio.start_server = functools.partial(asyncio.start_server, reuse_port=True)
    sys.argv[0] = "mitmdump"
    mitmdump()
