#!/bin/sh
# test_soak.sh - 64 clients against one moetierd for SOAK_SECONDS (default
# 20; the long soak: SOAK_SECONDS=600 SOAK_CLIENTS=64): random acquire,
# route, compute, prefetch and release, every expert served checked byte
# for byte against the pack, every COMPUTE against the FFN run locally; the
# daemon's RSS flat after the warm-up, its descriptors back to their count
# once the clients have gone, and a clean exit (tests/soak.c).
set -eu
. "$(dirname "$0")/daemon-env.sh"
env_init soak
secs=${SOAK_SECONDS:-20}
clients=${SOAK_CLIENTS:-64}
"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" -q
# a host arena of two thirds of the experts and a small GPU arena:
# evictions, loads and both tiers all the time
info=$("$B/tools/moe-pack" info "$tmp/m.moepack")
xb=$(echo "$info" | sed -n 's/^extent: .*, \([0-9]*\) bytes read size/\1/p')
layers=$(echo "$info" | sed -n 's/^extents: .*(\([0-9]*\) layers x .*/\1/p')
[ -n "$xb" ] && [ -n "$layers" ] || { echo "test_soak: cannot read moe-pack info" >&2; exit 1; }
host=$((xb * layers * 16 * 2 / 3))
daemon_start moetierd "$tmp/m.moepack" --host-bytes=$host --gpu-bytes=$((xb * 8)) --gpu-backend=emulated \
	--max-clients=$((clients + 8)) --wait-timeout-ms=500 --hello-timeout-ms=0 --no-seccomp
# Under ASan freed memory waits in its quarantine and the daemon's RSS
# follows the allocation rate, not leaks: there LeakSanitizer at the
# daemon's exit is the leak check, and the RSS bound is lifted (1 GiB).
slack=
if grep -q '^SAN_CFLAGS = .*-fsanitize=address' "$B/Makefile" 2>/dev/null; then
	slack="--rss-slack 1048576"
	echo "test_soak: sanitizer build: RSS not bounded (LeakSanitizer checks the daemon at its exit)"
fi
# shellcheck disable=SC2086
"$B/tests/soak" --socket "$sock" --pack "$tmp/m.moepack" --clients "$clients" --seconds "$secs" --pid "$pid" $slack
daemon_stop
