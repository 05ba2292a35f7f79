"""One supervisor task per instance, and the hub wiring discovery, supervisors, store and live fold."""
