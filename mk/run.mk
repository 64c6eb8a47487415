# run: moe-run, the client that decodes a real model through the daemon
# (client/run/: model, attention, tokenizer, sampler, experts, runner).
# The forward pass is a library of its own so that tests link it.
noinst_LIBRARIES += client/run/libmoerun.a
client_run_libmoerun_a_SOURCES = client/run/model.c client/run/model.h client/run/attention.c \
	client/run/attention.h client/run/experts.c client/run/experts.h client/run/runner.c client/run/runner.h

