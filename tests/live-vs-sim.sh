#!/bin/sh
# Live placement (issue 7, item 6): moe-client replay through a running
# moetierd must report a hit rate within 2 points of moe-sim for the same
# settings (cache slots per layer, policy, predictor, look-ahead), demand-only
# and with prefetch, cold cache per prompt and warm. Generated traces always;
# the real traces of ../shared too when they are there.
#
# Timing: moe-sim's --untimed mode lands every prefetch at once; the live
# replay gives each layer --layer-us of "compute" so the daemon's prefetches
# (tiny experts, microseconds to load) have landed before the next layer.
# The daemon's deadline is off here (--no-prefetch-deadline), as untimed
# replays have none: a prefetch planned at a token's start for its first layer
# would otherwise be judged by the daemon's own estimate of time it cannot
# know the same way moe-sim does.
set -eu
B=${MOETIER_BUILDDIR:-.}
for p in tools/moe-gen tools/moe-pack tools/moe-sim moetierd moe-client; do
	[ -x "$B/$p" ] || { echo "test_live: $B/$p not built" >&2; exit 77; }
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-live.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
TOL=${LIVE_TOLERANCE:-0.02}

"$B/tools/moe-gen" model --family deepseek_v2 --preset tiny --experts 64 --top-k 6 --layers 27 \
	--out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" --name live -q
rm -rf "$tmp/src"
"$B/tools/moe-gen" trace --tokens 120 --layers 26 --first-layer 1 --experts 64 --top-k 6 --seed 11 \
	--out "$tmp/g1.csv" >/dev/null
"$B/tools/moe-gen" trace --tokens 80 --layers 26 --first-layer 1 --experts 64 --top-k 6 --seed 12 \
	--out "$tmp/g2.csv" >/dev/null
mkdir -m 0755 "$tmp/run"
sock="$tmp/run/s.sock"

# live SLOTS "REPLAY ARGS" DAEMON ARGS... -> prints the live hit rate
live() {
	slots=$1 rargs=$2
	shift 2
	"$B/moetierd" --foreground --config= --socket="$sock" --socket-group= --host-bytes=64M \
		--layer-slots="$slots" --log-level=warn "$@" "$tmp/m.moepack" 2>"$tmp/d.log" &
	pid=$!
	i=0
	until "$B/moe-client" --socket "$sock" info >/dev/null 2>&1; do
		i=$((i + 1))
		if [ $i -gt 200 ] || ! kill -0 "$pid" 2>/dev/null; then
			echo "test_live: moetierd did not come up:" >&2
			cat "$tmp/d.log" >&2
			exit 1
		fi
		sleep 0.05
	done
	# shellcheck disable=SC2086
	"$B/moe-client" --socket "$sock" replay --brief $rargs >"$tmp/r.out"
	"$B/moe-client" --socket "$sock" info >/dev/null
	kill -TERM "$pid"
	rc=0
	wait "$pid" || rc=$?
	pid=
	if [ $rc -ne 0 ]; then
		echo "test_live: moetierd exited with $rc:" >&2
		cat "$tmp/d.log" >&2
		exit 1
	fi
	sed -n 's/^hit=\([0-9.]*\) .*/\1/p' "$tmp/r.out"
}

fail=0
# check NAME SIM_HIT LIVE_HIT
check() {
	ok=$(awk -v a="$2" -v b="$3" -v t="$TOL" 'BEGIN { d = a - b; if (d < 0) d = -d; print (a != "" && b != "" && d <= t) ? 1 : 0 }')
	printf '%-34s moe-sim %s  live %s  %s\n' "$1" "$2" "$3" "$([ "$ok" = 1 ] && echo ok || echo FAIL)"
	[ "$ok" = 1 ] || fail=1
}
simhit() {
	"$B/tools/moe-sim" replay --brief "$@" | sed -n 's/^hit=\([0-9.]*\) .*/\1/p'
}

G="$tmp/g1.csv $tmp/g2.csv"
# shellcheck disable=SC2086
{
	check "generated lru C=6 cold" "$(simhit --cache 6 $G)" "$(live 6 "--cold $G")"
	check "generated lru C=12 cold" "$(simhit --cache 12 $G)" "$(live 12 "--cold $G")"
	check "generated lru C=12 warm" "$(simhit --cache 12 --warm $G)" "$(live 12 "$G")"
	check "generated lfu C=12 warm" "$(simhit --policy lfu --cache 12 --warm $G)" "$(live 12 "$G" --policy=lfu)"
	check "generated arc C=12 cold" "$(simhit --policy arc --cache 12 $G)" "$(live 12 "--cold $G" --policy=arc)"
	check "generated coact C=12 prefetch h=1" \
		"$(simhit --cache 12 --predictor coact --lookahead 1 --untimed $G)" \
		"$(live 12 "--cold --layer-us 1000 $G" --predictor=coact --prefetch-lookahead=1 --no-prefetch-deadline)"
}
# The prefetch case must really have prefetched (else it would just be the
# demand case again): the daemon's prefetch counter, through moectl-free means:
# the same run with prefetch off must differ from the run with it on.
# shellcheck disable=SC2086
{
	on=$(live 12 "--cold --layer-us 1000 $G" --predictor=coact --prefetch-lookahead=1 --no-prefetch-deadline)
	off=$(live 12 "--cold --layer-us 1000 $G" --predictor=coact --prefetch-lookahead=1 --no-prefetch-deadline --no-prefetch)
	if [ "$on" = "$off" ]; then
		echo "test_live: prefetch on ($on) and off ($off) gave the same hit rate" >&2
		fail=1
	fi
}

D=${MOETIER_SHARED:-../shared}/traces/moe-beyond/training_data_eamc_1_1000
if [ -d "$D" ]; then
	R="$D/prompt_701_data.csv $D/prompt_702_data.csv $D/prompt_703_data.csv"
	# Trained on prompts never evaluated on.
	"$B/tools/moe-sim" train --out "$tmp/model.bin" --range 1-40 "$D" >/dev/null
	# shellcheck disable=SC2086
	{
		check "real lru C=6 cold" "$(simhit --cache 6 $R)" "$(live 6 "--cold $R")"
		check "real lru C=12 cold" "$(simhit --cache 12 $R)" "$(live 12 "--cold $R")"
		check "real combo C=6 prefetch h=1" \
			"$(simhit --cache 6 --predictor combo --model "$tmp/model.bin" --lookahead 1 --untimed $R)" \
			"$(live 6 "--cold --layer-us 1000 $R" --predictor=combo --predictor-model="$tmp/model.bin" \
				--prefetch-lookahead=1 --no-prefetch-deadline)"
	}
else
	echo "test_live: no real traces at $D (generated traces only)"
fi
exit $fail
