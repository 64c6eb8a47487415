#!/bin/sh
# test_crash.sh - crash consistency (issue 14.9):
#  1. moetierd killed with SIGKILL while 16 clients load experts (CRASH_ROUNDS
#     times, default 3), restarted on the same pack and the stale socket:
#     every expert is served again with the pack's own bytes (tests/soak --all),
#     and `moe-pack verify` finds the pack intact;
#  2. `moe-pack convert` killed with SIGKILL at CRASH_CONVERTS points of its
#     run (default 8), over an older pack at the same path: the path holds
#     either the old pack or the complete new one, byte for byte, and a daemon
#     started on it serves every expert with the bytes of whichever it is; a
#     temporary file left behind is refused by `moe-pack verify` and by
#     moetierd, or is the complete new pack - never served half-written.
# CRASH_ROUNDS / CRASH_CONVERTS raise the counts (the full mode).
set -eu
. "$(dirname "$0")/daemon-env.sh"
env_init crash
rounds=${CRASH_ROUNDS:-3}
converts=${CRASH_CONVERTS:-8}

gen() { "$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 32 --layers 6 --seed "$1" --out "$2" >/dev/null; }
gen 1 "$tmp/src1"
gen 2 "$tmp/src2"
"$B/tools/moe-pack" convert "$tmp/src1" -o "$tmp/old.moepack" -q
"$B/tools/moe-pack" convert "$tmp/src2" -o "$tmp/new.moepack" -q
cmp -s "$tmp/old.moepack" "$tmp/new.moepack" && { echo "test_crash: the two models are the same" >&2; exit 1; }

# ---- 1. kill -9 under load, restart ------------------------------------------
cp "$tmp/new.moepack" "$tmp/m.moepack"
pack_md5=$(md5sum <"$tmp/m.moepack")
# (daemon-env.sh's daemon_start uses $i: the loops here count with others)
round=0
while [ $round -lt "$rounds" ]; do
	round=$((round + 1))
	daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M --wait-timeout-ms=500 --no-seccomp
	"$B/tests/soak" --socket "$sock" --pack "$tmp/m.moepack" --clients 16 --seconds 3 >"$tmp/load.log" 2>&1 &
	load=$!
	sleep 0.$((3 + round % 6))
	kill -KILL "$pid"
	wait "$pid" 2>/dev/null || true
	pid=
	wait "$load" 2>/dev/null || true # its clients saw the daemon go: expected
	[ -S "$sock" ] || { echo "test_crash: round $round: the socket vanished with the daemon?" >&2; exit 1; }
	daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M --wait-timeout-ms=2000 --no-seccomp
	"$B/tests/soak" --socket "$sock" --pack "$tmp/m.moepack" --all
	daemon_stop
	[ "$(md5sum <"$tmp/m.moepack")" = "$pack_md5" ] || { echo "test_crash: the pack changed" >&2; exit 1; }
	"$B/tools/moe-pack" verify "$tmp/m.moepack" >/dev/null
	echo "test_crash: kill -9 under load, round $round: restarted, every expert served and checked"
done

# ---- 2. kill -9 during moe-pack convert -----------------------------------------
# How long a whole convert takes here, to spread the kills over it.
t0=$(date +%s%N)
"$B/tools/moe-pack" convert "$tmp/src2" -o "$tmp/timing.moepack" -q
t1=$(date +%s%N)
rm -f "$tmp/timing.moepack"
span_us=$(((t1 - t0) / 1000))
[ "$span_us" -gt 0 ] || span_us=1000
olds=0 news=0 tmps=0 tmp_refused=0
k=0
while [ $k -lt "$converts" ]; do
	k=$((k + 1))
	out="$tmp/conv.moepack"
	cp "$tmp/old.moepack" "$out"
	"$B/tools/moe-pack" convert "$tmp/src2" -o "$out" -q &
	cpid=$!
	# kill at k/(n+1) of the run (sleep takes fractions of a second)
	us=$((span_us * k / (converts + 1)))
	sleep "$((us / 1000000)).$(printf '%06d' $((us % 1000000)))"
	kill -KILL "$cpid" 2>/dev/null || true
	wait "$cpid" 2>/dev/null || true
	if cmp -s "$out" "$tmp/old.moepack"; then
		ref="$tmp/old.moepack"
		olds=$((olds + 1))
	elif cmp -s "$out" "$tmp/new.moepack"; then
		ref="$tmp/new.moepack"
		news=$((news + 1))
	else
		echo "test_crash: convert killed at ${us} us: $out is neither the old pack nor the new one" >&2
		exit 1
	fi
	daemon_start moetierd "$out" --host-bytes=1M --wait-timeout-ms=2000 --no-seccomp
	"$B/tests/soak" --socket "$sock" --pack "$ref" --all >/dev/null
	daemon_stop
	for t in "$out".*; do
		[ -e "$t" ] || continue
		tmps=$((tmps + 1))
		if cmp -s "$t" "$tmp/new.moepack"; then
			rm -f "$t"
			continue
		fi
		# a half-written file: refused by the verifier and by the daemon
		if "$B/tools/moe-pack" verify "$t" >"$tmp/v.log" 2>&1; then
			echo "test_crash: a half-written temporary file passes moe-pack verify:" >&2
			cat "$tmp/v.log" >&2
			exit 1
		fi
		[ -s "$tmp/v.log" ] || { echo "test_crash: moe-pack verify refused $t without a word" >&2; exit 1; }
		if "$B/moetierd" --foreground --config= --socket="$tmp/run/t.sock" --socket-group= --no-seccomp \
			--log-level=err "$t" 2>"$tmp/t.log" & tpid=$!; then :; fi
		sleep 0.3
		if kill -0 "$tpid" 2>/dev/null; then
			kill -KILL "$tpid"
			echo "test_crash: moetierd started on a half-written pack:" >&2
			cat "$tmp/t.log" >&2
			exit 1
		fi
		wait "$tpid" 2>/dev/null || true
		[ -s "$tmp/t.log" ] || { echo "test_crash: moetierd refused $t without a word" >&2; exit 1; }
		tmp_refused=$((tmp_refused + 1))
		rm -f "$t"
	done
done
# ---- 3. the temporary files of dead writers are removed by the next one --------
# A writer holds flock(LOCK_EX) on its PATH.XXXXXX until the rename: one that
# can be locked (and is older than 5 s) belongs to no live writer.
out="$tmp/sweep.moepack"
stale="$out.AbC123"
live="$out.LiVe99"
printf 'half-written' >"$stale"
printf 'being written' >"$live"
touch -d '-1 minute' "$stale" "$live"
flock --no-fork -x "$live" sleep 30 & holder=$!
sleep 0.3
"$B/tools/moe-pack" convert "$tmp/src2" -o "$out" 2>"$tmp/sweep.log" >/dev/null
[ -e "$stale" ] && { echo "test_crash: a dead writer's temporary file was not removed" >&2; cat "$tmp/sweep.log" >&2; exit 1; }
grep -q "AbC123: removed" "$tmp/sweep.log" || { echo "test_crash: the removal was not said:" >&2; cat "$tmp/sweep.log" >&2; exit 1; }
[ -e "$live" ] || { echo "test_crash: a locked (live) writer's temporary file was removed" >&2; exit 1; }
kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null || true
"$B/tools/moe-pack" convert "$tmp/src2" -o "$out" -q
[ -e "$live" ] && { echo "test_crash: the temporary file was not removed once its lock was gone" >&2; exit 1; }
cmp -s "$out" "$tmp/new.moepack" || { echo "test_crash: the sweep changed the pack" >&2; exit 1; }
left=$(ls "$tmp" | grep -c '\.moepack\.......$' || true)
[ "$left" -eq 0 ] || { echo "test_crash: $left temporary files left in $tmp" >&2; ls "$tmp" >&2; exit 1; }

echo "test_crash: moe-pack convert killed $converts times over ${span_us} us: old pack kept $olds, new pack complete $news; $tmps temporary files left, $tmp_refused of them half-written and refused by moe-pack verify and moetierd; every expert served was checked; a dead writer's temporary file is removed by the next convert, a live (locked) one is not"
