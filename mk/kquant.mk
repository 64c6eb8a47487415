# mk/kquant.mk - see Makefile.am; owned by one subsystem.
