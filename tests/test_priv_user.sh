#!/bin/sh
# The `user` privilege drop, as root: moetierd --user=SERVICE-USER runs, on
# EVERY thread (those started before the drop included), as that user and
# group with no supplementary groups, keeps exactly the permitted
# capabilities of PRIV_KEEP_CAPS (IPC_LOCK, SYS_NICE, PERFMON, BPF) in its
# permitted, effective and bounding sets and nothing inheritable or ambient,
# has no_new_privs and the seccomp filter, and still serves a client and an
# admin. The service user is moetier when it exists (etc/sysusers.d), else
# nobody.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "test_priv_user: $B/$p not built" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "needs root (to switch user): skipped"; exit 77; }
user=
for u in moetier nobody; do
	if id -u "$u" >/dev/null 2>&1; then
		user=$u
		break
	fi
done
[ -n "$user" ] || { echo "neither moetier nor nobody exists: skipped"; exit 77; }
uid=$(id -u "$user")
gid=$(id -g "$user")
env_init priv-user
# The service user must reach nothing here but what was opened as root.
chmod 0711 "$tmp"

"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" -q
fail() { echo "FAIL: $*" >&2; cat "$tmp/d.log" >&2; exit 1; }
# The emulated GPU tier starts worker threads before the drop.
daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M --gpu-bytes=256K --user="$user"

# Root's full set has all four kept capabilities permitted.
keep=$(printf '%016x' $(((1 << 14) | (1 << 23) | (1 << 38) | (1 << 39))))
n=0
for st in /proc/$pid/task/*/status; do
	n=$((n + 1))
	tid=$(basename "$(dirname "$st")")
	f() { awk -v k="$1:" '$1 == k { $1 = ""; sub(/^ /, ""); print }' "$st"; }
	[ "$(f Uid)" = "$uid $uid $uid $uid" ] || fail "thread $tid: Uid $(f Uid), expected $uid (real, effective, saved, fs)"
	[ "$(f Gid)" = "$gid $gid $gid $gid" ] || fail "thread $tid: Gid $(f Gid), expected $gid"
	[ -z "$(f Groups)" ] || fail "thread $tid: supplementary groups kept: $(f Groups)"
	for set in CapPrm CapEff CapBnd; do
		[ "$(f $set)" = "$keep" ] || fail "thread $tid: $set = $(f $set), expected $keep"
	done
	for set in CapInh CapAmb; do
		[ "$(f $set)" = 0000000000000000 ] || fail "thread $tid: $set = $(f $set)"
	done
	[ "$(f NoNewPrivs)" = 1 ] || fail "thread $tid: NoNewPrivs $(f NoNewPrivs)"
	[ "$(f Seccomp)" = 2 ] || fail "thread $tid: Seccomp $(f Seccomp)"
done
[ $n -ge 3 ] || fail "only $n threads: the pre-drop threads were not checked"

# It serves: a data client (bytes), an admin (root), the GPU tier.
"$B/moe-client" --socket "$sock" acquire 1 3 5 >"$tmp/acq" || fail "acquire as $user"
grep -q "2 of 2 served" "$tmp/acq" || fail "acquire: $(cat "$tmp/acq")"
"$B/moectl" --socket "$sock" stats >"$tmp/stats" || fail "stats"
grep -q "server_clients_accepted" "$tmp/stats" || fail "stats: no server counters"
"$B/moectl" --socket "$sock" pin 2 7 --tier gpu >"$tmp/pin" 2>&1 || fail "pin on the GPU tier: $(cat "$tmp/pin")"
daemon_stop
echo "test_priv_user: $n threads as $user ($uid:$gid), capabilities $keep everywhere, served"
