"""Agent and backend SDKs and operator CLIs: what runs beside the broker, never inside it (imports no server module)."""
