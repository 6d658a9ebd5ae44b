"""Engines: a model that steps many sequences at once. `Engine` runs the experts as functions on a platform,
`MonolithicEngine` keeps every expert in its own process (the comparison users would otherwise deploy)."""
