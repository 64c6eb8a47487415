# tokenizer: moe-run's tokenizer and sampler (client/run/tokenizer.c, sampler.c) and their tests.
