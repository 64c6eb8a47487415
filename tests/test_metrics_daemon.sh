#!/bin/sh
# The Prometheus exposition a running moetierd serves (moectl stats
# --prometheus), checked against the conventions by a small parser: every
# counter ends in _total and nothing else does, histograms are in seconds or
# bytes with le="+Inf", _sum and _count, every sample has a # TYPE, no family
# is declared twice, and no per-(layer, expert) series unless asked for
# (--per-expert: 4 series per expert, 6,656 for a 26 x 64 model).
# Black box: it checks what every renderer (stats.c, server_admin.c,
# compute.c, bpf.c) contributes, and moectl's --per-expert.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "test_metrics_daemon: $B/$p not built" >&2; exit 77; }
done
PY=/usr/bin/python3
[ -x $PY ] || PY=python3
env_init metrics

"$B/tools/moe-gen" model --family deepseek_v2 --preset tiny --experts 16 --top-k 2 --layers 5 \
	--out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" --name metrics -q
"$B/tools/moe-gen" trace --tokens 20 --layers 4 --first-layer 1 --experts 16 --top-k 2 --seed 3 \
	--out "$tmp/t.csv" >/dev/null
daemon_start moetierd "$tmp/m.moepack" --host-bytes=4M
# traffic, so that the per-expert counters are not all zero
timeout 60 "$B/moe-client" --socket "$sock" replay --brief "$tmp/t.csv" >/dev/null

cat >"$tmp/check.py" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
want_expert = sys.argv[2] == "1"
fams, errs, n_expert = {}, [], 0
sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$')
for line in text.splitlines():
    if line.startswith("# HELP ") or not line:
        continue
    if line.startswith("# TYPE "):
        _, _, name, typ = line.split(" ", 3)
        if name in fams:
            errs.append("family %s declared twice" % name)
        fams[name] = {"type": typ, "inf": False, "sum": False, "count": False}
        if typ == "counter" and not name.endswith("_total"):
            errs.append("counter %s does not end in _total" % name)
        if typ != "counter" and name.endswith("_total"):
            errs.append("%s %s ends in _total" % (typ, name))
        if typ == "histogram" and not (name.endswith("_seconds") or name.endswith("_bytes")):
            errs.append("histogram %s is not in seconds or bytes" % name)
        if re.search(r'_(ns|us|ms)(_|$)', name):
            errs.append("%s is not in a base unit" % name)
        continue
    m = sample.match(line)
    if not m:
        errs.append("bad line: %s" % line)
        continue
    name, labels = m.group(1), m.group(2) or ""
    float(m.group(3))
    if 'expert="' in labels:
        n_expert += 1
    f = fams.get(name)
    if f is None:
        for suf in ("_bucket", "_sum", "_count"):
            b = name[:-len(suf)] if name.endswith(suf) else None
            if b and b in fams and fams[b]["type"] == "histogram":
                f = fams[b]
                f[suf[1:]] = True
                if suf == "_bucket" and 'le="+Inf"' in labels:
                    f["inf"] = True
    if f is None:
        errs.append("sample without # TYPE: %s" % line)
for name, f in fams.items():
    if f["type"] == "histogram" and not (f["inf"] and f["sum"] and f["count"]):
        errs.append("histogram %s lacks le=\"+Inf\", _sum or _count" % name)
if want_expert and n_expert == 0:
    errs.append("--per-expert: no per-expert series")
if not want_expert and n_expert:
    errs.append("%d per-expert series without --per-expert" % n_expert)
for e in errs[:60]:
    print("FAIL:", e)
print("%d families, %d per-expert series, %d problems" % (len(fams), n_expert, len(errs)))
sys.exit(1 if errs else 0)
PY
rc=0
"$B/moectl" --socket "$sock" stats --prometheus >"$tmp/p.txt"
$PY "$tmp/check.py" "$tmp/p.txt" 0 || rc=1
if "$B/moectl" --socket "$sock" stats --prometheus --per-expert >"$tmp/pe.txt" 2>"$tmp/pe.err"; then
	$PY "$tmp/check.py" "$tmp/pe.txt" 1 || rc=1
else
	echo "FAIL: moectl stats --prometheus --per-expert: $(cat "$tmp/pe.err")"
	rc=1
fi
daemon_stop
exit $rc
