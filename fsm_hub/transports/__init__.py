"""How clients reach the hub: stdio and Streamable HTTP."""
