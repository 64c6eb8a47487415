# mk/hardening.mk - see Makefile.am; owned by one subsystem.
