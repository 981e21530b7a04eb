"""HTTP routers, one per resource: classify, health, model, metrics."""
