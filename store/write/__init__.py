"""The write path: the writer's contract and thread, the writer process, the outage journal, and a
batch of records applied in one transaction."""
