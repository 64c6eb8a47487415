# service: filled in by its subsystem.
