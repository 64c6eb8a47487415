# mk/fidelity.mk - see Makefile.am; owned by one subsystem.
