#!/bin/sh
# systemd-analyze verify on the shipped units. It exits 0 even for unknown
# keys and unparsable values, so any output at all is a failure
# (platform.md section 7); ExecStart points at the built binary because
# verify checks that it exists.
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-.}
if ! command -v systemd-analyze >/dev/null 2>&1; then
	echo "systemd-analyze not installed: skipped"
	exit 77
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-unit.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
bin=$(cd "$B" && pwd)/moetierd
[ -x "$bin" ] || { echo "build moetierd first" >&2; exit 1; }
sed "s#^ExecStart=/usr/sbin/moetierd#ExecStart=$bin#" "$S/etc/moetierd.service" >"$tmp/moetierd.service"
grep -q "^ExecStart=$bin" "$tmp/moetierd.service"
cp "$S/etc/moetierd.socket" "$tmp/moetierd.socket"
out=$(cd "$tmp" && systemd-analyze verify --man=no ./moetierd.service ./moetierd.socket 2>&1) || {
	echo "$out" >&2
	exit 1
}
if [ -n "$out" ]; then
	echo "systemd-analyze verify printed:" >&2
	echo "$out" >&2
	exit 1
fi
# The check must be able to fail: a bogus key is reported.
printf '[Service]\nBogusKey=1\n' >>"$tmp/moetierd.service"
out=$(cd "$tmp" && systemd-analyze verify --man=no ./moetierd.service 2>&1) || true
if [ -z "$out" ]; then
	echo "systemd-analyze verify did not flag a bogus key: the check is blind" >&2
	exit 1
fi
echo ok
