"""The event log: the single writer, the readers, the schema and the recorder that commits transitions."""
