"""MCP servers the tests talk to: real SDK servers (`sdk_server`) and misbehaving ones (`faults`)."""
