"""The operator's side: metrics, health, the HTTP API and config reload."""
