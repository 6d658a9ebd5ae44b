"""Private mode: one orchestrator process per tenant (its own control plane), every orchestrator calling the
server's one pool of functions through the gateway."""
