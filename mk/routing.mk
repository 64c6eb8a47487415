# mk/routing.mk - see Makefile.am; owned by one subsystem.
