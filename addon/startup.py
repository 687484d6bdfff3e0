"""Start-up problems as one clear line each, so a bad option or file reads as an error, not a crash.

mitmproxy logs an ``OptionsError`` raised while a script loads together with its traceback, and
silently keeps ``--set`` values of options nobody declared. Its error check then exits non-zero on
any error logged during start-up; these helpers only make what it prints readable.
"""

from __future__ import annotations

import logging

from mitmproxy import exceptions

_SCRIPT_LOGGER = "mitmproxy.addons.script"


class _OptionErrorsOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, exceptions.OptionsError):
            record.msg, record.args = "%s", (str(error),)
            record.exc_info = record.exc_text = None
        return True


def install_one_line_option_errors() -> None:
    logger = logging.getLogger(_SCRIPT_LOGGER)
    if not any(isinstance(f, _OptionErrorsOneLine) for f in logger.filters):
        logger.addFilter(_OptionErrorsOneLine())


def unknown_options_message(deferred: dict) -> str | None:
    """What to say about ``--set`` names no addon declared (mitmproxy would ignore them)."""
    if not deferred:
        return None
    names = ", ".join(sorted(deferred))
    return f"unknown option(s): {names} (mitmdump --options lists every option; codex_* options are in the README)"
