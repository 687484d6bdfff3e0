"""What the relay tells: Prometheus metrics, webhook alerts, its per-call log lines. Plain Python."""
