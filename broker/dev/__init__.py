"""Development tools (dev IdP, dev PKI, demo stack, benchmarks): imported lazily by the CLI, never by the server."""
