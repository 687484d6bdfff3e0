"""What may pass: canonical request targets and bodies, the endpoints the relay knows, secrets kept
out of what leaves. Plain Python."""
