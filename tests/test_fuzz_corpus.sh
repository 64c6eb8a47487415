#!/bin/sh
# test_fuzz_corpus.sh - replays the committed seed corpora of the libFuzzer
# targets (tests/fuzz/corpus/*) through the same harnesses linked with a
# plain main (tests/fuzz/replay_*): every seed and every past crash kept
# there must run clean (in the ASan build: no sanitizer report either).
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-${srcdir:-.}}
for t in ring ctl pack; do
	bin="$B/tests/fuzz/replay_$t"
	if [ ! -x "$bin" ]; then
		echo "test_fuzz_corpus: $bin not built" >&2
		exit 1
	fi
	out=$(timeout 120 "$bin" "$S/tests/fuzz/corpus/$t")
	echo "$out"
	n=$(echo "$out" | sed -n 's/.*: \([0-9]*\) inputs$/\1/p')
	# the corpus must have been run, not found empty
	[ "${n:-0}" -ge 3 ] || { echo "test_fuzz_corpus: $t: only ${n:-0} inputs ran" >&2; exit 1; }
done
# past findings, fixed: each must run clean (ctl-zero-length-fd: a
# descriptor sent with a zero-length message was never closed)
out=$(timeout 120 "$B/tests/fuzz/replay_ctl" "$S/tests/fuzz/known")
echo "$out"
echo "test_fuzz_corpus: ok"
