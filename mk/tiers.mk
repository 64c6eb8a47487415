# tiers: filled in by its subsystem.
