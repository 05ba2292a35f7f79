"""The pure core: events, the declared machine, the fold and the audit. No I/O, no asyncio."""
