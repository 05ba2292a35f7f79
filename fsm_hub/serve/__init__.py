"""One `fsm-hub serve` process: owning the log, or attaching to its owner as a bridge."""
