"""The MCP protocol: the upstream client towards instances, downstream sessions, hub tools and tool naming."""
