# tests/daemon-env.sh - sourced by the shell tests that run their own
# moetierd: a temporary directory removed on exit (the daemon stopped first),
# starting a daemon on a socket in it and waiting until it answers, stopping
# it and failing with its log when it did not exit cleanly.
#   . "$(dirname "$0")/daemon-env.sh"; env_init NAME
# sets tmp, sock (in $tmp/run, mode 0755) and B (the build directory).
B=${MOETIER_BUILDDIR:-.}
pid=

env_cleanup() {
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}

# env_init NAME [DIR]: the temporary directory (under DIR, default $TMPDIR or /tmp)
env_init() {
	tmp=$(mktemp -d "${2:-${TMPDIR:-/tmp}}/moetier-$1.XXXXXX")
	trap env_cleanup EXIT INT TERM
	mkdir -m 0755 "$tmp/run"
	sock="$tmp/run/s.sock"
}

# daemon_start BINARY PACK [OPTIONS...]: BINARY is moetierd or moetierd-debug;
# its stderr goes to $tmp/d.log.
daemon_start() {
	bin=$1
	pack=$2
	shift 2
	"$B/$bin" --foreground --config= --socket="$sock" --socket-group= --log-level=warn "$@" "$pack" \
		2>"$tmp/d.log" &
	pid=$!
	i=0
	until "$B/moe-client" --socket "$sock" info >/dev/null 2>&1; do
		i=$((i + 1))
		if [ $i -gt 200 ] || ! kill -0 "$pid" 2>/dev/null; then
			echo "$(basename "$0"): moetierd did not come up:" >&2
			cat "$tmp/d.log" >&2
			exit 1
		fi
		sleep 0.05
	done
}

# daemon_stop: SIGTERM; a non-zero exit fails the test with the daemon's log.
daemon_stop() {
	kill -TERM "$pid"
	rc_=0
	wait "$pid" || rc_=$?
	pid=
	if [ $rc_ -ne 0 ]; then
		echo "FAIL: moetierd exited with $rc_" >&2
		cat "$tmp/d.log" >&2
		exit 1
	fi
}
