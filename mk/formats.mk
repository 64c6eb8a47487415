# formats: filled in by its subsystem.
