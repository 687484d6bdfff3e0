"""Option values mitmproxy has no type for, parsed once in ``configure``."""

from __future__ import annotations

from mitmproxy import exceptions

from addon.services import settings


def seconds(name: str, value: str, *, allow_zero: bool = True) -> float:
    """``addon.services.settings.seconds`` for an addon's ``configure``: a bad value is an ``OptionsError``."""
    try:
        return settings.seconds(name, value, allow_zero=allow_zero)
    except settings.SettingsError as e:
        raise exceptions.OptionsError(str(e)) from None
