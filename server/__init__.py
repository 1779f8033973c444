"""kvserve HTTP server: OpenAI-compatible routes, schemas and Prometheus metrics."""
