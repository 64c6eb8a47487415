# kernels: filled in by its subsystem.
