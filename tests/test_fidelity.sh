#!/bin/sh
# Routing fidelity on the trained model (issue 13; doc/fidelity.md):
#  - moe-run --dump-routing writes the trace CSV and its router-logits side
#    file; moe-sim reads both (its route rows say they use the router's
#    logits, and a truncated side file is refused);
#  - moe-run's simulated cache under exact routing has moe-sim's untimed hit
#    rate on the trace it dumped (same policy, same size), and does not change
#    a bit of the perplexity;
#  - a cache-aware rule substitutes and raises the simulated hit rate; exact
#    routing substitutes nothing; pre-gating predicts better than chance;
#  - through moetierd, pre-gating hints and a cache-aware rule run (the hints
#    change no bit; the rule substitutes against the daemon's residency,
#    decided in the client or by the daemon's ROUTE);
#  - bench/fidelity --tiny ends with its line, numbers in range.
# Skips (77) when no trained model is in models/.
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-..}
dir=${MOETIER_TRAINED_DIR:-$S/models}

for p in moe-run moetierd moe-client tools/moe-pack tools/moe-sim; do
	[ -x "$B/$p" ] || { echo "test_fidelity: $B/$p is missing" >&2; exit 1; }
done
# shellcheck disable=SC2012 # our names, no blanks
model=$(ls -t "$dir"/debian-moe-*.gguf 2>/dev/null | head -1)
if [ -z "$model" ] || [ ! -f "${model%.gguf}.heldout.txt" ]; then
	echo "test_fidelity: no trained model in $dir: skip"
	exit 77
fi
env_init fidelity
"$B/tools/moe-pack" convert "$model" -o "$tmp/m.moepack" -q
head -c 5000 "${model%.gguf}.heldout.txt" >"$tmp/text"
"$B/tools/moe-pack" info --json "$tmp/m.moepack" >"$tmp/pack.json"
E=$(sed -n 's/^ *"n_experts": *\([0-9]*\).*/\1/p' "$tmp/pack.json" | head -1)
K=$(sed -n 's/^ *"top_k": *\([0-9]*\).*/\1/p' "$tmp/pack.json" | head -1)
C=$((E / 4))
[ "$C" -lt "$K" ] && C=$K
fail=0
bad() { echo "test_fidelity: $*" >&2; fail=1; }
field() { sed -n "s/^moe-run: fidelity .* $1=\([0-9.]*\).*/\1/p" "$2"; }
run() { # OUT ARGS...: moe-run --local --ppl on the text, stderr in $tmp/OUT.err
	o=$1
	shift
	"$B/moe-run" "$tmp/m.moepack" --ppl "$tmp/text" --ctx 64 -t 2 "$@" 2>"$tmp/$o.err" >"$tmp/$o.out" ||
		{ cat "$tmp/$o.err" >&2; bad "moe-run $* failed"; }
}

# exact routing: plain, then with a simulated cache, pre-gating and the dump
run plain --local
run exact --local --sim-cache "$C" --pregate 2 --dump-routing "$tmp/tr.csv"
if cmp -s "$tmp/plain.out" "$tmp/exact.out"; then
	echo "exact routing with a simulated cache: $(cat "$tmp/exact.out"), as without"
else
	bad "the simulated cache changed exact routing's perplexity: $(cat "$tmp/plain.out") / $(cat "$tmp/exact.out")"
fi
[ "$(field subst "$tmp/exact.err")" = 0.000000 ] || bad "exact routing substituted: $(grep fidelity "$tmp/exact.err")"
head -1 "$tmp/tr.csv" | grep -q '^Layer ID,Batch Number,Token,Activated Expert IDs' || bad "no trace header"
n_tok=$(sed -n 's/^ppl: .* (\([0-9]*\) chunks of 64)/\1/p' "$tmp/exact.out")
layers=$(sed -n 's/^ *"n_layers": *\([0-9]*\).*/\1/p' "$tmp/pack.json" | head -1)
want=$((24 + n_tok * 64 * layers * E * 4))
got=$(stat -c %s "$tmp/tr.csv.logits")
[ "$got" = "$want" ] || bad "logits side file: $got bytes, want $want ($n_tok chunks x 64 x $layers x $E floats + 24)"
head -c 8 "$tmp/tr.csv.logits" | grep -q MOERLG01 || bad "logits side file: no MOERLG01 magic"

# moe-sim on the dump: the same hit rate as moe-run's simulated cache
run_hit=$(field sim_hit "$tmp/exact.err")
sim_hit=$("$B/tools/moe-sim" replay --untimed --brief --policy lru --cache "$C" "$tmp/tr.csv" |
	sed -n 's/^hit=\([0-9.]*\).*/\1/p')
if awk -v a="$run_hit" -v b="$sim_hit" 'BEGIN { exit !(a - b < 1e-4 && b - a < 1e-4 && a > 0) }'; then
	echo "simulated cache of $C slots: moe-run hit $run_hit, moe-sim on its dump $sim_hit"
else
	bad "simulated cache: moe-run hit $run_hit, moe-sim $sim_hit"
fi
"$B/tools/moe-sim" replay --untimed --policy lru --cache "$C" --route-keep 1 --route-margin 2 "$tmp/tr.csv" \
	>"$tmp/sim-route.out"
if grep -q "router logits from the traces' .logits files" "$tmp/sim-route.out" &&
	grep -q 'substitution rate 0\.[0-9]*[1-9]' "$tmp/sim-route.out"; then
	echo "moe-sim route rows on the dumped logits: $(grep 'substitution rate' "$tmp/sim-route.out")"
else
	bad "moe-sim did not route on the dumped logits: $(cat "$tmp/sim-route.out")"
fi
head -c 1000 "$tmp/tr.csv.logits" >"$tmp/short.logits"
cp "$tmp/tr.csv" "$tmp/short.csv"
mv "$tmp/short.logits" "$tmp/short.csv.logits"
if "$B/tools/moe-sim" replay --untimed --cache "$C" "$tmp/short.csv" >/dev/null 2>"$tmp/short.err"; then
	bad "moe-sim took a truncated logits file"
elif ! grep -q 'short.csv.logits' "$tmp/short.err"; then
	bad "moe-sim: truncated logits file: unclear error: $(cat "$tmp/short.err")"
fi

# a cache-aware rule: substitutes, and hits more than exact routing
run rule --local --sim-cache "$C" --route margin --route-keep 1 --route-margin 2
subst=$(field subst "$tmp/rule.err")
rule_hit=$(field sim_hit "$tmp/rule.err")
if awk -v s="$subst" -v h="$rule_hit" -v e="$run_hit" 'BEGIN { exit !(s > 0 && s < 1 && h > e) }'; then
	echo "margin rule (keep 1, margin 2): substitution rate $subst, hit $rule_hit (exact $run_hit)"
else
	bad "margin rule: substitution rate '$subst', hit '$rule_hit' (exact $run_hit)"
fi
# pre-gating: better than chance (k/E) one layer ahead, in [0, 1]
pg1=$(field pg1 "$tmp/exact.err")
if awk -v r="$pg1" -v k="$K" -v e="$E" 'BEGIN { exit !(r > 1.5 * k / e && r <= 1) }'; then
	echo "pre-gating recall@$K one layer ahead: $pg1 (chance $(awk -v k="$K" -v e="$E" 'BEGIN { print k / e }'))"
else
	bad "pre-gating recall one layer ahead: '$pg1'"
fi
# a fitted pre-gate (calibrated on other text) runs and still predicts
tail -c 6000 "${model%.gguf}.heldout.txt" >"$tmp/calib"
run fit --local --pregate 1 --pregate-fit "$tmp/calib"
fpg1=$(field pg1 "$tmp/fit.err")
if grep -q '^moe-run: pre-gating fitted on [1-9][0-9]* tokens' "$tmp/fit.err" && cmp -s "$tmp/fit.out" "$tmp/plain.out" &&
	awk -v r="$fpg1" -v k="$K" -v e="$E" 'BEGIN { exit !(r > 1.5 * k / e && r <= 1) }'; then
	echo "fitted pre-gate: recall@$K one layer ahead $fpg1 (the router's: $pg1), perplexity unchanged"
else
	cat "$tmp/fit.err" >&2
	bad "fitted pre-gate: recall '$fpg1', $(cat "$tmp/fit.out")"
fi
# the similarity rule, the experts' similarity measured on other text
run simr --local --sim-cache "$C" --route similarity --route-keep 1 --route-margin 2 --route-calib "$tmp/calib"
ssubst=$(field subst "$tmp/simr.err")
if grep -q '^moe-run: expert similarity measured on' "$tmp/simr.err" &&
	awk -v s="$ssubst" 'BEGIN { exit !(s > 0 && s < 1) }'; then
	echo "similarity rule (keep 1, margin 2): substitution rate $ssubst, $(cat "$tmp/simr.out")"
else
	cat "$tmp/simr.err" >&2
	bad "similarity rule: substitution rate '$ssubst'"
fi
# cache-aware routing needs a cache
if "$B/moe-run" "$tmp/m.moepack" --local --ppl "$tmp/text" --ctx 64 --route margin >/dev/null 2>"$tmp/nocache.err"; then
	bad "--route margin ran with --local and no cache"
fi

# through the daemon: a quarter of the experts in the arena
slot=$("$B/tools/moe-pack" info "$tmp/m.moepack" | awk '/^extent:/ {print $(NF-3)}')
n=$("$B/tools/moe-pack" info "$tmp/m.moepack" | awk '/^extents:/ {print $2}')
daemon_start moetierd "$tmp/m.moepack" --host-bytes=$((slot * n / 4)) --gpu-bytes=0
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --prefetch pregate --pregate 2 --ppl "$tmp/text" --ctx 64 \
	>"$tmp/d.out" 2>"$tmp/d.err" || { cat "$tmp/d.err" >&2; bad "moe-run --prefetch pregate through moetierd failed"; }
if cmp -s "$tmp/d.out" "$tmp/plain.out" && grep -q 'prefetch hints ([0-9.]*% then chosen)' "$tmp/d.err" &&
	! grep -q ' 0 prefetch hints' "$tmp/d.err"; then
	echo "through moetierd with pre-gating hints: $(cat "$tmp/d.out"), as --local; $(grep -o '[0-9]* prefetch hints ([0-9.]*% then chosen)' "$tmp/d.err")"
else
	cat "$tmp/d.err" >&2
	bad "pre-gating hints through moetierd: '$(cat "$tmp/d.out")' vs --local '$(cat "$tmp/plain.out")'"
fi
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --route margin --route-keep 1 --route-margin 2 --ppl "$tmp/text" \
	--ctx 64 >"$tmp/dr.out" 2>"$tmp/dr.err" || { cat "$tmp/dr.err" >&2; bad "moe-run --route margin through moetierd failed"; }
dsubst=$(field subst "$tmp/dr.err")
if awk -v s="$dsubst" 'BEGIN { exit !(s > 0 && s < 1) }'; then
	echo "margin rule through moetierd: substitution rate $dsubst, $(cat "$tmp/dr.out")"
else
	bad "margin rule through moetierd: substitution rate '$dsubst'"
fi
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --route margin --route-keep 1 --route-margin 2 --route-via daemon \
	--ppl "$tmp/text" --ctx 64 --batch 8 >"$tmp/dv.out" 2>"$tmp/dv.err" ||
	{ cat "$tmp/dv.err" >&2; bad "moe-run --route-via daemon failed"; }
vsubst=$(field subst "$tmp/dv.err")
if awk -v s="$vsubst" 'BEGIN { exit !(s > 0 && s < 1) }'; then
	echo "margin rule through the daemon's ROUTE: substitution rate $vsubst, $(cat "$tmp/dv.out")"
else
	bad "margin rule through the daemon's ROUTE: substitution rate '$vsubst'"
fi
daemon_stop

# the benchmark on a tiny setting
MOETIER_BUILDDIR=$B MOETIER_SRCDIR=$S sh "$S/bench/fidelity" --tiny --model "$model" >"$tmp/bench.out" 2>"$tmp/bench.err" ||
	{ cat "$tmp/bench.err" >&2; bad "bench/fidelity --tiny failed"; }
last=$(tail -1 "$tmp/bench.out")
if echo "$last" | grep -Eq '^fidelity: miss_cut=-?[0-9]+\.[0-9]+ ppl=[+-][0-9]+\.[0-9]+% \(best rule at 25% cache\)$'; then
	echo "bench/fidelity --tiny: $last"
else
	cat "$tmp/bench.out" >&2
	bad "bench/fidelity --tiny: last line '$last'"
fi
# its exact rows substitute nothing and agree with themselves; hit rates in [0, 1]
awk '$2 ~ /^exact/ && ($5 != "0.0000" || $8 != "1.0000") { print "exact row: " $0; b = 1 }
     $1 ~ /%$/ && !($4 >= 0 && $4 <= 1) { print "hit out of range: " $0; b = 1 }
     END { exit b }' "$tmp/bench.out" || bad "bench/fidelity --tiny: rows out of range"
grep -q '^pregate: recall@' "$tmp/bench.out" || bad "bench/fidelity --tiny: no pre-gating line"
exit $fail
