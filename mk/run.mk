# run: moe-run, the client that decodes a real model through the daemon
# (client/run/: model, attention, tokenizer, sampler, experts, runner).
