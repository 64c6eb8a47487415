#!/bin/sh
# The cache's I/O thread runs at io-thread-nice (default -5), the other
# threads at the daemon's own priority; 0 leaves it there too; stats info
# io_thread_nice says what applies.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "$B/$p not built" >&2; exit 77; }
done
env_init io-nice
"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" -q

# nices THREADS: "nice count" per distinct nice among the daemon's threads
nices() {
	for t in /proc/"$pid"/task/*/stat; do
		# field 19 after the command (which may hold blanks) in parentheses
		sed 's/^.*) //' "$t" | awk '{ print $17 }'
	done | sort -n | uniq -c | awk '{ printf "%s:%s ", $2, $1 }'
}

daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M
got=$(nices)
echo "default: threads by nice: $got"
case " $got" in *" -5:1 "*) ;; *) echo "FAIL: not exactly one thread at nice -5: $got" >&2; exit 1 ;; esac
for n in $got; do
	case $n in -5:* | 0:*) ;; *) echo "FAIL: a thread at an unexpected nice: $n" >&2; exit 1 ;; esac
done
"$B/moectl" --socket "$sock" stats --json >"$tmp/s.json"
grep -q '"io_thread_nice": *"-5"' "$tmp/s.json" || { echo "FAIL: stats do not say io_thread_nice -5" >&2; grep -o '"io_thread_nice[^,]*' "$tmp/s.json" >&2 || true; exit 1; }
daemon_stop

daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M --io-thread-nice=0
got=$(nices)
echo "io-thread-nice=0: threads by nice: $got"
case $got in "0:"*" ") ;; *) echo "FAIL: a thread away from nice 0: $got" >&2; exit 1 ;; esac
[ "$(echo "$got" | wc -w)" -eq 1 ] || { echo "FAIL: $got" >&2; exit 1; }
daemon_stop
echo ok
