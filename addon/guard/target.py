"""Request targets: which ones the relay accepts, and which of them are the admin page's.

One predicate per question, shared by every addon, so that no two addons can read one path two ways
(client auth skipping what the admin page does not answer, a node receiving what the relay never
checked). A target is canonical when it is an origin-form path of printable ASCII (one leading ``/``)
with no fragment, no backslash, no dot segment, no percent-encoded ``/``, ``.``, ``\\`` or unreserved
character in the path, and an API endpoint's path in lower case: then what the client, the relay and the
node see is the same path, however the node's server normalises it.
"""

from __future__ import annotations

import ipaddress
import re

from addon.guard.endpoints import detect_format

ADMIN_PREFIX = "/admin"
HEALTH_PATH = "/healthz"  # a balancer's check: 200 while the relay takes calls, 503 starting or draining
METRICS_PATH = "/metrics"  # Prometheus scrapes it; the admin page's access rules apply

# Percent escapes that would turn into a separator or a dot segment at the node.
_HIDDEN_SEPARATOR = re.compile(r"%(?:2[fFeE]|5[cC])")
# Percent escapes of unreserved characters (RFC 3986: letters, digits, '-', '.', '_', '~'), which a canonical
# path never has: many servers decode them, so "/v1/respons%65s" is the node's "/v1/responses".
_ENCODED_UNRESERVED = re.compile(r"%(?:[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeE]|5[fF]|7[eE])")


def target_problem(target: str) -> str | None:
    """Why ``target`` (mitmproxy's ``request.path``: path and query) is not canonical, or None."""
    if not target.startswith("/") or target.startswith("//"):
        return "the request target must be a path starting with a single '/'"
    if not target.isascii() or not target.isprintable() or " " in target:
        return "the request target must be printable ASCII"
    if "#" in target:
        return "the request target must not contain '#'"
    path = target.partition("?")[0]
    if "\\" in path:
        return "the request path must not contain '\\'"
    if "%" in path and _HIDDEN_SEPARATOR.search(path):
        return "the request path must not percent-encode '/', '.' or '\\'"
    if "%" in path and _ENCODED_UNRESERVED.search(path):
        return "the request path must not percent-encode letters, digits or '-', '.', '_', '~'"
    if not path.islower() and detect_format(path.lower()) is not None:  # many servers ignore case
        return "the path of an API endpoint must be lower case"
    # Every segment sits between two slashes once one is added (the path starts with one): this runs
    # three times a call, splitting the path into a list did not need to.
    dotted = path + "/"
    if dotted.find("/./") >= 0 or dotted.find("/../") >= 0:
        return "the request path must not contain '.' or '..' segments"
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address (IPv6 with or without brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def route(target: str) -> str:
    """The path of a request target, without its query string."""
    return target.partition("?")[0]


def is_admin_path(target: str) -> bool:
    """A canonical target of the admin page (``/admin``, ``/admin/…``, ``/metrics``); anything else is not."""
    path = route(target)  # the cheap test first: it runs for every request
    return ((path in (METRICS_PATH, ADMIN_PREFIX) or path.startswith(ADMIN_PREFIX + "/"))
            and target_problem(target) is None)


# claude-relay-service's usage endpoint, answered by addon.userstats (the key comes in the body).
USER_STATS_PATH = "/apiStats/api/user-model-stats"


def is_user_stats_path(target: str) -> bool:
    """A canonical target of the usage endpoint; client auth lets it through (the key is in the body)."""
    return route(target) == USER_STATS_PATH and target_problem(target) is None


# A client key's own limits and use, answered by addon.keyinfo (the key in the usual auth header).
KEY_INFO_PATH = "/v1/key"


def is_key_info_path(target: str) -> bool:
    """A canonical target of the key info endpoint: OpenAI's base URL (``…/v1``) and Anthropic's (the root) both
    reach it as ``key`` and ``v1/key``."""
    return route(target) == KEY_INFO_PATH and target_problem(target) is None


def is_own_endpoint(target: str, *, reverse: bool, client_keys: bool) -> bool:
    """Whether the relay answers this request itself, needing no client key: on its own port (``reverse``; in
    regular mode such a path belongs to whatever site the client asked for), the admin page and /metrics (their
    own token) and, with ``client_keys`` set, the usage endpoint (``addon.userstats``: the key in its body, as
    claude-relay-service takes it)."""
    return reverse and (is_admin_path(target) or (client_keys and is_user_stats_path(target)))


def is_health_path(target: str) -> bool:
    """The balancer's health check (``HEALTH_PATH``, any query)."""
    return route(target) == HEALTH_PATH
