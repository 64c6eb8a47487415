# mk/latent.mk - see Makefile.am; owned by one subsystem.
