#!/bin/sh
# One model, two sources: moe-gen writes the same weights as GGUF and as
# safetensors (+ config.json, tokenizer.json); moe-pack makes a whole-model
# pack of each (llama.cpp's tensor names and gguf.kv either way, Mixtral's
# q/k rows permuted as llama.cpp's converter does). moe-run must give
# byte-identical teacher-forced logits from both, for every architecture; and
# a pack without dense tensors (--experts-only) runs with --gguf to the same bits.
set -eu
B=${MOETIER_BUILDDIR:-.}

for p in moe-run tools/moe-gen tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "test_moe_run_formats: $B/$p is missing" >&2; exit 1; }
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-run-formats.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

toks=1,259,87,364,302,280,268,262,270,287,438
fail=0
for arch in qwen3_moe qwen2_moe olmoe mixtral; do
	o=$tmp/$arch
	"$B/tools/moe-gen" model --family "$arch" --format gguf --dtype f32 --preset tiny-lm --out "$o-gguf" >/dev/null
	"$B/tools/moe-gen" model --family "$arch" --format safetensors --dtype f32 --preset tiny-lm --out "$o-st" \
		>/dev/null
	"$B/tools/moe-pack" convert "$o-gguf/model.gguf" -o "$o-gguf.moepack" -q
	"$B/tools/moe-pack" convert "$o-st" -o "$o-st.moepack" -q
	"$B/tools/moe-pack" convert "$o-gguf/model.gguf" -o "$o-eo.moepack" --experts-only -q
	"$B/moe-run" "$o-gguf.moepack" --local --tokens "$toks" --dump-logits "$o-gguf.lg" --quiet
	"$B/moe-run" "$o-st.moepack" --local --tokens "$toks" --dump-logits "$o-st.lg" --quiet
	"$B/moe-run" "$o-eo.moepack" --gguf "$o-gguf/model.gguf" --local --tokens "$toks" --dump-logits "$o-eo.lg" \
		--quiet
	if cmp "$o-gguf.lg" "$o-st.lg" && cmp "$o-gguf.lg" "$o-eo.lg"; then
		echo "$arch: GGUF, safetensors and --experts-only + --gguf packs give the same logits"
	else
		echo "test_moe_run_formats: $arch: logits differ between the packs" >&2
		fail=1
	fi
done
exit $fail
