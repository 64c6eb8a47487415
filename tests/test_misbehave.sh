#!/bin/sh
# seccomp, black box (memcached's misbehave test): the debug daemon, asked
# by an admin (moectl config set misbehave PROBE) to make a syscall its
# allow-list forbids, dies of SIGSYS - for a network socket (socket() is
# allowed for AF_UNIX only), execve, and a call on no list at all (syslog).
# The same probe under --no-seccomp returns, the daemon says the call was not
# stopped and serves on (so the kill above is the filter's). The release
# daemon has no such command. In a sanitizer build execve is answered EPERM
# (the sanitizer's symbolizer would be killed otherwise): checked as such.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "test_misbehave: $B/$p not built" >&2; exit 1; }
done
[ -x "$B/moetierd-debug" ] || { echo "moetierd-debug not built (configure --enable-debug): skipped"; exit 77; }
env_init misbehave

"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" -q
ctl() { "$B/moectl" --socket "$sock" "$@"; }
status_of() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
fail() { echo "FAIL: $*" >&2; cat "$tmp/d.log" >&2; exit 1; }

# Ended (a zombie not yet waited for counts) within 10 s?
ended() {
	i_=0
	while [ $i_ -lt 100 ]; do
		[ -r "/proc/$pid/status" ] || return 0
		grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && return 0
		sleep 0.1
		i_=$((i_ + 1))
	done
	return 1
}
sanitizer=$(ldd "$B/moetierd-debug" 2>/dev/null | grep -c -e libasan -e libtsan || true)

for probe in socket execve syslog; do
	daemon_start moetierd-debug "$tmp/m.moepack" --host-bytes=1M
	[ "$(status_of Seccomp)" = 2 ] || fail "no seccomp filter (Seccomp: $(status_of Seccomp))"
	# It serves under the filter...
	"$B/moe-client" --socket "$sock" acquire 1 3 5 >"$tmp/acq" || fail "acquire under the filter"
	ctl stats >/dev/null || fail "stats under the filter"
	# ...and dies of the forbidden call.
	if [ "$probe" = execve ] && [ "$sanitizer" -gt 0 ]; then
		ctl config set misbehave "$probe" >"$tmp/ctl" 2>&1 && fail "execve: no error reported"
		grep -q "not stopped by seccomp (returned -1)" "$tmp/ctl" || fail "execve: $(cat "$tmp/ctl")"
		grep -q "Operation not permitted" "$tmp/d.log" || fail "execve in a sanitizer build: not EPERM"
		daemon_stop
		echo "misbehave execve: EPERM (sanitizer build)"
		continue
	fi
	ctl config set misbehave "$probe" >"$tmp/ctl" 2>&1 && fail "$probe: moectl got an answer: $(cat "$tmp/ctl")"
	ended || fail "$probe: moetierd-debug still runs 10 s after the forbidden call"
	rc=0
	wait "$pid" || rc=$?
	pid=
	[ $rc -gt 128 ] && [ "$(kill -l $rc)" = SYS ] ||
		fail "$probe: moetierd-debug ended with status $rc, not SIGSYS"
	grep -q "was not stopped" "$tmp/d.log" && fail "$probe: the daemon says the call went through"
	echo "misbehave $probe: killed by SIGSYS"
done

# The control: no filter, the same probes return and the daemon serves on.
daemon_start moetierd-debug "$tmp/m.moepack" --host-bytes=1M --no-seccomp
[ "$(status_of Seccomp)" = 0 ] || fail "--no-seccomp installed a filter"
for probe in socket syslog execve; do
	ctl config set misbehave "$probe" >"$tmp/ctl" 2>&1 && fail "$probe without a filter: no error reported"
	grep -q "not stopped by seccomp" "$tmp/ctl" || fail "$probe without a filter: $(cat "$tmp/ctl")"
done
ctl config set misbehave nonsense >"$tmp/ctl" 2>&1 && fail "an unknown probe was accepted"
grep -q "unknown probe" "$tmp/ctl" || fail "unknown probe: $(cat "$tmp/ctl")"
"$B/moe-client" --socket "$sock" acquire 1 3 5 >/dev/null || fail "acquire after the probes without a filter"
daemon_stop
echo "misbehave without seccomp: every probe returned, daemon served on and exited cleanly"

# The release daemon: no such command.
daemon_start moetierd "$tmp/m.moepack" --host-bytes=1M
ctl config set misbehave socket >"$tmp/ctl" 2>&1 && fail "the release daemon accepted misbehave"
grep -q "unknown option" "$tmp/ctl" || fail "release daemon: $(cat "$tmp/ctl")"
kill -0 "$pid" || fail "the release daemon died"
daemon_stop
echo "test_misbehave: ok"
