#!/bin/sh
# moetierd serves a MoLAE latent pack (moe-pack molae, issue 15 item 3):
# B stays resident, ACQUIRE hands out exactly the pack's (smaller) extents,
# the same --host-bytes hold more latent experts than dense ones, COMPUTE
# equals the CPU latent kernel (tests/molae_serve_check), and `moectl stats`
# shows the latent rank and the resident B bytes. A latent pack whose B is
# missing is refused with a clear message.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moectl moe-client tests/molae_serve_check; do
	[ -x "$B/$p" ] || { echo "$B/$p not built" >&2; exit 77; }
done
"$B/tools/moe-pack" molae --help 2>&1 | grep -q "not built" && { echo "moe-pack built without LAPACKE"; exit 77; }
env_init molae
"$B/tools/moe-gen" model --family qwen3_moe --preset tiny-lm --format gguf --dtype f32 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/d.moepack" -q
"$B/tools/moe-pack" molae --rank 32 --group-size 4 "$tmp/d.moepack" -o "$tmp/l.moepack" -q >/dev/null

daemon_start moetierd "$tmp/l.moepack" --host-bytes=2M
timeout 60 "$B/tests/molae_serve_check" "$sock" "$tmp/l.moepack" "$tmp/d.moepack"
"$B/moectl" --socket "$sock" stats >"$tmp/stats"
grep -E 'compute_latent_(rank|groups|b_bytes)' "$tmp/stats"
grep -Eq 'compute_latent_rank +32$' "$tmp/stats" || { echo "FAIL: moectl stats shows no latent rank"; cat "$tmp/stats"; exit 1; }
grep -Eq 'compute_latent_b_bytes +[1-9]' "$tmp/stats" || { echo "FAIL: moectl stats shows no B bytes"; exit 1; }
grep -Eq 'compute_latent_z_rows +[1-9]' "$tmp/stats" || { echo "FAIL: no latent projections counted"; exit 1; }
daemon_stop

# Hostile: a latent pack whose B fails its checksum is refused at start.
"$B/tests/molae_serve_check" --corrupt-b "$tmp/l.moepack" "$tmp/bad.moepack"
rc=0
timeout 20 "$B/moetierd" --foreground --config= --socket="$tmp/run/bad" --socket-group= --host-bytes=2M \
	"$tmp/bad.moepack" 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -eq 1 ] || { echo "FAIL: moetierd exited $rc on a latent pack with a corrupt B (want 1)"; exit 1; }
grep -q 'MoLAE latent pack.*molae_b_up' "$tmp/err" || { echo "FAIL: no clear message"; exit 1; }
[ ! -e "$tmp/run/bad" ] || { echo "FAIL: socket left behind"; exit 1; }
echo ok
