# placement: filled in by its subsystem.
