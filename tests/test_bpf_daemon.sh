#!/bin/sh
# The daemon's eBPF view, black box: it attaches at start-up; a cold replay's
# expert loads show up as at least that many block read requests of the
# pack's device with plausible latencies; the pre-faulted host arena counts
# no daemon fault, and a client's first touch of its read-only mapping
# counts; with every program failing to load (fault injection) or --no-bpf
# the daemon serves as before and says why in its stats.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "test_bpf_daemon: $B/$p not built" >&2; exit 77; }
done
[ "$(id -u)" -eq 0 ] || { echo "needs root (CAP_BPF and CAP_PERFMON)"; exit 77; }
env_init bpf "${MOETIER_BUILDDIR:-/tmp}"

"$B/tools/moe-gen" model --family deepseek_v2 --preset tiny --experts 16 --top-k 2 --layers 5 \
	--out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" --name bpf -q
"$B/tools/moe-gen" trace --tokens 30 --layers 4 --first-layer 1 --experts 16 --top-k 2 --seed 5 \
	--out "$tmp/t.csv" >/dev/null
start() { # daemon binary, extra options...
	bin_=$1
	shift
	daemon_start "$bin_" "$tmp/m.moepack" --host-bytes=4M "$@"
}
json() { # python expression over the stats JSON (s) -> printed
	"$B/moectl" --socket "$sock" stats --json >"$tmp/s.json"
	python3 -c "import json,sys; s=json.load(open(sys.argv[1])); m=next(iter(s['models'].values())); print($1)" "$tmp/s.json"
}

start moetierd
st=$(json "s['bpf']['programs']['iolat']")
if [ "$st" != attached ]; then
	case $st in *"built without"*) echo "daemon built without eBPF: $st"; exit 77 ;; esac
	echo "FAIL: iolat not attached as root: $st"; exit 1
fi
reads0=$(json "sum(r['lat_us']['count'] for r in s['bpf']['iolat'] if r['op'] == 'read')")
"$B/moe-client" --socket "$sock" replay --brief --cold "$tmp/t.csv"
loads=$(json "m['counters']['cache_loads_host']")
reads1=$(json "sum(r['lat_us']['count'] for r in s['bpf']['iolat'] if r['op'] == 'read')")
p50=$(json "[r for r in s['bpf']['iolat'] if r['op'] == 'read'][0]['lat_us']")
echo "expert loads $loads, block read requests seen $((reads1 - reads0)); read latency histogram $p50"
[ "$loads" -gt 0 ] || { echo "FAIL: the cold replay loaded nothing"; exit 1; }
[ $((reads1 - reads0)) -ge "$loads" ] || { echo "FAIL: fewer block reads than expert loads"; exit 1; }
json "s['bpf']['iolat'][0]['lat_us']['sum'] / max(1, s['bpf']['iolat'][0]['lat_us']['count'])" >"$tmp/mean"
awk '{ if ($1 < 1 || $1 > 1000000) { print "FAIL: mean read latency " $1 " us"; exit 1 } }' "$tmp/mean"
df=$(json "sum(a['daemon'] for a in s['bpf']['arena_faults'])")
[ "$df" -eq 0 ] || { echo "FAIL: the pre-faulted arena faulted $df times in the daemon"; exit 1; }
# a client reading its read-only mapping of the arena for the first time
"$B/moe-client" --socket "$sock" acquire 0 0 1 2 3 >/dev/null
cf=$(json "sum(a['clients'] for a in s['bpf']['arena_faults'])")
[ "$cf" -ge 1 ] || { echo "FAIL: a client's first touch of the arena counted no fault"; exit 1; }
rq=$(json "s['bpf']['runqlat_us']['count']")
[ "$rq" -gt 0 ] || { echo "FAIL: no run-queue wait of the daemon's threads"; exit 1; }
"$B/moectl" --socket "$sock" stats --prometheus | grep -q '^moetier_block_request_seconds_bucket{dev=' ||
	{ echo "FAIL: no Prometheus histogram"; exit 1; }
daemon_stop
echo "ok: attached; $loads loads -> $((reads1 - reads0)) block reads; arena faults daemon 0, clients $cf; $rq run-queue waits"

# --no-bpf, and (debug build) every program failing to load: still serving.
start moetierd --no-bpf
st=$(json "s['bpf']['programs']['runqlat']")
case $st in *"--no-bpf"*) ;; *) echo "FAIL: --no-bpf: $st"; exit 1 ;; esac
"$B/moe-client" --socket "$sock" replay --brief "$tmp/t.csv" >/dev/null
daemon_stop
if [ -x "$B/moetierd-debug" ]; then
	MOETIER_FAULTS=bpf.load:0:-1 start moetierd-debug
	st=$(json "s['bpf']['programs']['faults']")
	case $st in *injected*) ;; *) echo "FAIL: injected load failure: $st"; exit 1 ;; esac
	"$B/moe-client" --socket "$sock" replay --brief --cold "$tmp/t.csv" >/dev/null
	daemon_stop
	echo "ok: with every program failing to load the daemon served: $st"
fi
