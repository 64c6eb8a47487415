#!/bin/sh
# etc/moetierd.conf must be exactly what the option table generates, and
# the generated file must load back; bad options are clear errors.
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-.}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-conf.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$B/moetierd" --dump-config --config= >"$tmp/gen.conf"
if ! diff -u "$S/etc/moetierd.conf" "$tmp/gen.conf"; then
	echo "etc/moetierd.conf is stale: regenerate with 'moetierd --dump-config --config= > etc/moetierd.conf'" >&2
	exit 1
fi
# The file loads back to the same values.
"$B/moetierd" --dump-config --config="$S/etc/moetierd.conf" >"$tmp/again.conf"
diff -u "$tmp/gen.conf" "$tmp/again.conf"
# Flags override the file; the file overrides defaults.
printf 'ring-spin-us = 7\nhost-bytes = 3G\n' >"$tmp/a.conf"
"$B/moetierd" --dump-config --config="$tmp/a.conf" --ring-spin-us=9 >"$tmp/b.conf"
grep -qx 'ring-spin-us = 9' "$tmp/b.conf"
grep -qx 'host-bytes = 3G' "$tmp/b.conf"
# doc/moetierd.conf.5 documents every option of the table.
for name in $(sed -n 's/^\([a-z-]*\) = .*/\1/p' "$tmp/gen.conf"); do
	esc=$(printf '%s' "$name" | sed 's/-/\\\\-/g')
	if ! grep -q "^\.B $esc\$" "$S/doc/moetierd.conf.5"; then
		echo "doc/moetierd.conf.5 does not document '$name'" >&2
		exit 1
	fi
done
# Errors name the problem and exit 2.
expect_fail() {
	rc=0
	"$B/moetierd" --dump-config "$@" >/dev/null 2>"$tmp/err" || rc=$?
	if [ $rc -ne 2 ] || ! grep -q "$EXPECT" "$tmp/err"; then
		echo "moetierd $*: rc $rc, stderr: $(cat "$tmp/err")" >&2
		exit 1
	fi
}
EXPECT="unknown option" expect_fail --config= --bogus=1
EXPECT="out of range" expect_fail --config= --max-clients=1000
EXPECT="power of two" expect_fail --config= --ring-entries=100
EXPECT="bad size" expect_fail --config= --host-bytes=lots
printf 'no equals sign here\n' >"$tmp/bad.conf"
EXPECT="bad.conf:1" expect_fail --config="$tmp/bad.conf"
echo ok
