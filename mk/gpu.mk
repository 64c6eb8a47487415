# gpu: filled in by its subsystem.
