# tokenizer: moe-run's tokenizer and sampler (client/run/tokenizer.c, sampler.c)
# and their tests. A small library of their own so that moe-run (mk/run.mk)
# and the tests link the same objects: a program adds $(TOK_LINK) before
# $(CORE_LINK). The BPE pre-tokenizer regexes need PCRE2.
noinst_LIBRARIES += libmoerun_tok.a
libmoerun_tok_a_SOURCES = client/run/tokenizer.c client/run/tokenizer.h \
	client/run/sampler.c client/run/sampler.h
TOK_CPPFLAGS = -I$(top_srcdir)/client/run
TOK_LINK = libmoerun_tok.a $(PCRE2_LIBS)
dist_doc_DATA += doc/tokenizer.md

# tok-encode: prints the ids of a text under a GGUF's tokenizer, for the
# comparison with llama.cpp (tests/test_tokenizer_llama.sh).
check_PROGRAMS += tests/tok-encode
tests_tok_encode_SOURCES = tests/tok-encode.c
tests_tok_encode_CPPFLAGS = $(AM_CPPFLAGS) $(TOK_CPPFLAGS)
tests_tok_encode_LDADD = $(TOK_LINK) $(CORE_LINK)

TESTS += tests/test_tokenizer_llama.sh
EXTRA_DIST += tests/test_tokenizer_llama.sh

if HAVE_CRITERION
check_PROGRAMS += tests/test_tokenizer tests/test_sampler
TESTS += tests/test_tokenizer tests/test_sampler
tests_test_tokenizer_SOURCES = tests/test_tokenizer.c tests/testutil.h
tests_test_tokenizer_CPPFLAGS = $(AM_CPPFLAGS) $(TOK_CPPFLAGS)
tests_test_tokenizer_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_tokenizer_LDADD = $(TOK_LINK) $(CORE_LINK) $(CRITERION_LIBS)
tests_test_sampler_SOURCES = tests/test_sampler.c
tests_test_sampler_CPPFLAGS = $(AM_CPPFLAGS) $(TOK_CPPFLAGS)
tests_test_sampler_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_sampler_LDADD = $(TOK_LINK) $(CORE_LINK) $(CRITERION_LIBS)
endif
