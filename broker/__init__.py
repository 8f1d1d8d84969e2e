"""broker: the Policy Enforcement Point between AI agents and their tools."""
