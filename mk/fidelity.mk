# mk/fidelity.mk - see Makefile.am; owned by one subsystem.
# fidelity: what cache-aware routing and pre-gating buy and cost on the
# trained model (bench/fidelity, doc/fidelity.md; moe-run's --route,
# --sim-cache, --pregate, --dump-routing and moe-sim's logits side files).
TESTS += tests/test_fidelity.sh
EXTRA_DIST += tests/test_fidelity.sh bench/fidelity doc/fidelity.md
