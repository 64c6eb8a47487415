# placement: eviction policies, predictors, prefetch scheduler, routing, moe-sim.
libmoecore_a_SOURCES += core/policy.h core/policy_impl.h core/policy.c core/policy_lru.c \
	core/policy_lfu.c core/policy_leaststale.c core/policy_arc.c core/policy_belady.c \
	core/route.h core/route.c
libmoecore_a_SOURCES += core/predict.h core/predict.c core/predict_temporal.c \
	core/predict_coact.c core/predict_tokenid.c core/predict_tracematch.c \
	core/predict_learned.c core/predict_combo.c core/prefetch.h core/prefetch.c

bin_PROGRAMS += tools/moe-sim
tools_moe_sim_SOURCES = tools/moe-sim.c tools/sim.c tools/sim.h tools/sim_train.c
tools_moe_sim_LDADD = $(CORE_LINK)

if HAVE_CRITERION
check_PROGRAMS += tests/test_policy tests/test_route tests/test_predict tests/test_sim
TESTS += tests/test_policy tests/test_route tests/test_predict tests/test_sim
tests_test_policy_SOURCES = tests/test_policy.c tests/testutil.h
tests_test_policy_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_policy_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
tests_test_route_SOURCES = tests/test_route.c tests/testutil.h tests/route_ref.h
tests_test_route_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_route_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
tests_test_predict_SOURCES = tests/test_predict.c tests/testutil.h tools/sim.c tools/sim.h tools/sim_train.c
tests_test_predict_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_predict_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_predict_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
tests_test_sim_SOURCES = tests/test_sim.c tests/testutil.h tools/sim.c tools/sim.h tools/sim_train.c
tests_test_sim_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_sim_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_sim_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
endif

dist_noinst_SCRIPTS += bench/hitrate
dist_man_MANS += doc/moe-sim.1
dist_doc_DATA += doc/placement.md
