# pack: filled in by its subsystem.
