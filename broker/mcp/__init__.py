"""The MCP Streamable HTTP transport (CONTRACT §7): JSON-RPC in and out over the one pipeline."""
