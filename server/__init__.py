"""silofed.server: the coordinator's Flower ServerApp, its strategy wrappers, the round workflow,
and the run directory with its report."""
