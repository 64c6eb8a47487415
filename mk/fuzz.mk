# mk/fuzz.mk - see Makefile.am; owned by one subsystem.
