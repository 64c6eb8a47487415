#!/bin/sh
# The layering check (scripts/layering) passes on this tree, and fails,
# naming the file, the line and the header, on a copy with one planted
# violation per rule of doc/architecture.md.
set -u
src=${MOETIER_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
"$src/scripts/layering" "$src" || { echo "FAIL: the tree breaks its own layering"; exit 1; }

tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
fail=0
plant() { # folder/file, header it must not include
	rm -rf "$tmp/t"; mkdir "$tmp/t"
	(cd "$src" && cp -r include core kernels daemon client tools "$tmp/t/")
	sed -i "1a #include \"$2\"" "$tmp/t/$1"
	out=$("$src/scripts/layering" "$tmp/t" 2>&1)
	rc=$?
	if [ $rc -eq 1 ] && echo "$out" | grep -q "^$1:2: includes .*/$2 "; then
		echo "ok: $1 including $2 is refused"
	else
		echo "FAIL: $1 including $2 passed the check (rc=$rc): $out"; fail=1
	fi
}
plant core/trace.c cache.h        # core -> daemon
plant core/route.c cli.h          # core -> client
plant core/dtype.c ffn.h          # core -> kernels
plant kernels/ffn.c server.h      # kernels -> daemon
plant client/moectl.c tier_gpu.h  # client -> daemon
plant tools/moe-pack.c cache.h    # tools -> daemon
# What the layers allow passes: core may include the public headers.
rm -rf "$tmp/t"; mkdir "$tmp/t"
(cd "$src" && cp -r include core kernels daemon client tools "$tmp/t/")
sed -i '1a #include "moetier/proto.h"' "$tmp/t/core/pack.c"
sed -i '1a #include "pack.h"' "$tmp/t/kernels/ffn.c"
if "$src/scripts/layering" "$tmp/t" >/dev/null; then echo "ok: allowed includes pass"; else
	echo "FAIL: an allowed include was refused"; fail=1; fi
exit $fail
