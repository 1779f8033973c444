"""kvserve engine: scheduling, KV-block bookkeeping, model execution and sampling."""
