"""Finding instances: announcement files in the instances directory (and, later, configured servers)."""
