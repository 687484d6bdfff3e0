"""Metering: reading what a call used from its stream or body, in the three APIs' shapes, and what
its outcome means. Plain Python."""
