#!/bin/sh
# Tiering changes no bit: moe-run's teacher-forced logits through moetierd,
# with a host arena holding about 10% of the experts (misses, evictions,
# io_uring loads, prefetch hints two layers ahead) and a second client
# decoding beside it, are byte-identical to moe-run --local (every expert in memory); also with
# one token at a time on 2 threads, and the prompt batched then --feed ids
# one decode step each (their bench line's decode-only counters must show
# misses and bytes read). The runs must have missed and read from
# the pack, or the test proves nothing.
set -eu
. "$(dirname "$0")/daemon-env.sh"

for p in moe-run moetierd moe-client tools/moe-gen tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "test_moe_run_daemon: $B/$p is missing" >&2; exit 1; }
done

env_init moe-run-daemon

# 4 MoE layers x 32 experts (128), top-4; Q8_0 experts of 6.4 KiB in 8 KiB slots
"$B/tools/moe-gen" model --family qwen3_moe --format gguf --dtype q8_0 --preset tiny --heads 4 --kv-heads 2 \
	--head-dim 16 --experts 32 --top-k 4 --layers 4 --seed 3 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/m.moepack" -q

toks=$(seq -s, 1 60)
"$B/moe-run" "$tmp/m.moepack" --local --tokens "$toks" --dump-logits "$tmp/local.lg" --quiet

# 13 slots of 8 KiB: 10% of the 128 experts
daemon_start moetierd "$tmp/m.moepack" --host-bytes=104K --gpu-bytes=0
"$B/moe-client" --socket "$sock" info | grep 'host arena'

# the second client: decodes 1500 tokens beside the teacher-forced runs
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --prefetch --tokens 5,6,7 -n 1500 --temp 0.8 --seed 9 >"$tmp/b.out" 2>&1 &
bpid=$!
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --prefetch-depth 2 --tokens "$toks" --dump-logits "$tmp/d1.lg" 2>"$tmp/d1.err" ||
	{ cat "$tmp/d1.err" >&2; exit 1; }
MOETIER_RUN_SPLIT_MIN=0 "$B/moe-run" "$tmp/m.moepack" --socket "$sock" --tokens "$toks" --dump-logits "$tmp/d2.lg" \
	--batch 1 -t 2 2>"$tmp/d2.err" || { cat "$tmp/d2.err" >&2; exit 1; }
# a 10-token prompt, then 50 ids fed one decode step each, from @FILEs
seq -s, 1 10 >"$tmp/p.ids"
seq -s, 11 60 >"$tmp/f.ids"
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --tokens @"$tmp/p.ids" --feed @"$tmp/f.ids" --dump-logits "$tmp/d3.lg" \
	-t 2 2>"$tmp/d3.err" || { cat "$tmp/d3.err" >&2; exit 1; }
wait $bpid || { echo "test_moe_run_daemon: the second client failed:" >&2; cat "$tmp/b.out" >&2; exit 1; }
cat "$tmp/d1.err" "$tmp/d2.err" "$tmp/d3.err"

fail=0
if ! cmp "$tmp/local.lg" "$tmp/d3.lg"; then
	echo "test_moe_run_daemon: d3: --feed logits through the daemon differ from --local" >&2
	fail=1
fi
bl=$(grep '^moe-run: bench ' "$tmp/d3.err" || true)
case $bl in
*" n_prefill=10 n_decode=50 "*) ;;
*) echo "test_moe_run_daemon: d3: bench line wrong or missing: '$bl'" >&2; fail=1 ;;
esac
if echo "$bl" | grep -q ' miss=0\.0000 ' || echo "$bl" | grep -q ' read_decode_bytes_per_tok=0 ' ||
	! echo "$bl" | grep -q ' decode_tps=[0-9]*\.[0-9]* .* hit_host=0\.[0-9]* .* stall_decode_ms_per_tok=[0-9.]* resident_bytes=[1-9][0-9]* kv_bytes=[1-9]'; then
	echo "test_moe_run_daemon: d3: the decode steps show no misses or no reads: '$bl'" >&2
	fail=1
fi
for r in d1 d2; do
	if ! cmp "$tmp/local.lg" "$tmp/$r.lg"; then
		echo "test_moe_run_daemon: $r: logits through the daemon differ from --local" >&2
		fail=1
	fi
	# the summary must show misses and bytes read, or nothing was tiered
	grep -q 'missed [1-9]' "$tmp/$r.err" || grep -q 'missed 0\.[0-9]*[1-9]' "$tmp/$r.err" || {
		echo "test_moe_run_daemon: $r: no misses: the arena did not tier anything" >&2
		fail=1
	}
	if grep -q 'NVMe read 0 B/token' "$tmp/$r.err"; then
		echo "test_moe_run_daemon: $r: nothing read from the pack" >&2
		fail=1
	fi
done
daemon_stop
[ $fail -eq 0 ] && echo "test_moe_run_daemon: logits through a 10% host arena are bit-identical to --local"
exit $fail
