# gen: filled in by its subsystem.
