#!/bin/sh
# moe-run's tokenizer (client/run/tokenizer.c, through tests/tok-encode)
# against llama.cpp, two ways:
#  1. llama.cpp's own vocabulary suites (models/ggml-vocab-*.gguf with their
#     .inp texts and .out ids, from the peer's source tree): the same ids;
#  2. the harness tests/llama-oracle on the models moe-run meets: the SPM
#     vocabularies of llama-oracle mkmodel and moe-gen, the trained models in
#     models/*.gguf (GPT-2-style BPE) and a few of llama.cpp's vocabularies:
#     a set of texts encoded by both, with and without BOS and special
#     parsing, and the held-out texts (models/*.heldout.txt) as perplexity
#     encodes them, must give identical ids.
# Skips (77) when neither llama.cpp's source nor the harness is there.
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-..}
T=$B/tests/tok-encode
O=$B/tests/llama-oracle
LLSRC=${MOETIER_LLAMA_SRC:-/var/cache/moetier/llama/src}
[ -x "$T" ] || { echo "tests/tok-encode is not built" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-tok.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
checked=0
failed=0

# 1. llama.cpp's vocabulary suites: encoded without BOS and special parsing,
# as its test-tokenizer-0 does. The vocabularies moe-run supports: SPM,
# GPT-2 (gpt-2, mpt), Qwen2, llama3 (llama-bpe), phi-3 (SPM with stripping).
suites=0
for v in llama-spm gpt-2 mpt qwen2 llama-bpe phi-3; do
	m=$LLSRC/models/ggml-vocab-$v.gguf
	[ -f "$m" ] && [ -f "$m.inp" ] && [ -f "$m.out" ] || continue
	"$T" --no-add-special --no-parse-special "$m" -b "$m.inp" >"$tmp/got" || {
		echo "FAIL: tok-encode on $v" >&2
		failed=$((failed + 1))
		continue
	}
	sed 's/^ *//; s/ *$//; s/  */,/g' "$m.out" >"$tmp/want"
	n=$(wc -l <"$tmp/want")
	if ! diff "$tmp/want" "$tmp/got" >"$tmp/diff"; then
		echo "FAIL: $v: ids differ from llama.cpp's expectations (want < > got):" >&2
		head -20 "$tmp/diff" >&2
		failed=$((failed + 1))
	fi
	echo "suite $v: $n texts"
	checked=$((checked + n))
	suites=$((suites + 1))
done

# 2. The harness, text by text.
if [ -x "$O" ]; then
	models=""
	"$O" mkmodel "$tmp/mk.gguf" --arch llama --seed 3 >/dev/null && models="$tmp/mk.gguf"
	if [ -x "$B/tools/moe-gen" ]; then
		for p in tiny tiny-lm; do
			if "$B/tools/moe-gen" model --family qwen3_moe --format gguf --preset $p --seed 5 \
				--out "$tmp/gen-$p" >/dev/null 2>&1; then
				models="$models $tmp/gen-$p/model.gguf"
			fi
		done
	fi
	for m in "$S"/models/*.gguf; do
		[ -f "$m" ] && models="$models $m"
	done
	# (Qwen2's 150k-token vocabulary is left to its suite above: slow to load.)
	for v in llama-spm gpt-2; do
		m=$LLSRC/models/ggml-vocab-$v.gguf
		[ -f "$m" ] && models="$models $m"
	done

	# The texts, one file each: spaces, newlines, digits, contractions,
	# unicode, an emoji (bytes in a small vocabulary), control-token text.
	i=0
	for s in 'hello the world' ' leading space' 'two  spaces and trailing  ' \
		'tabs\tand\nnew\n\nlines\n' "don't stop, we'll see; IT'S" 'digits 12345 and 6.78' \
		'h\303\251llo \346\227\245\346\234\254' 'emoji \360\237\246\231\360\237\221\215\360\237\217\275!' \
		'<s>hello</s> <|endoftext|> <|im_end|>' '\r\n\r\n  x' 'a'; do
		printf "$s" >"$tmp/text$i"
		i=$((i + 1))
	done
	n_texts=$i
	for m in $models; do
		rc=0
		"$T" "$m" x >/dev/null 2>"$tmp/err" || rc=$?
		if [ $rc -eq 3 ]; then
			# moe-gen's tiny preset writes "no_vocab": llama.cpp has no tokenizer either
			echo "harness $(basename "$(dirname "$m")")/$(basename "$m"): no tokenizer ($(cat "$tmp/err"))"
			continue
		fi
		bad=0
		k=0
		while [ $k -lt $n_texts ]; do
			# (harness flags, tok-encode flags) with the same meaning
			for f in 0 1 2; do
				case $f in
				0) of=""; tf="--no-parse-special" ;;
				1) of="--no-special"; tf="--no-add-special --no-parse-special" ;;
				2) of="--parse-special"; tf="" ;;
				esac
				want=$("$O" tokenize "$m" $of --file "$tmp/text$k" 2>"$tmp/err") || {
					echo "harness failed on $m: $(tail -1 "$tmp/err")" >&2
					bad=$((bad + 1))
					continue
				}
				got=$("$T" $tf "$m" -f "$tmp/text$k" 2>&1) || true
				if [ "$want" != "$got" ]; then
					echo "FAIL: $m text $k ($(od -An -c "$tmp/text$k" | tr -s ' ' | head -c 60)) $of:" >&2
					echo "  llama.cpp: $want" >&2
					echo "  moe-run:   $got" >&2
					bad=$((bad + 1))
				fi
				checked=$((checked + 1))
			done
			k=$((k + 1))
		done
		# Whole held-out texts of the trained models, as perplexity encodes them.
		for h in "$S"/models/*.heldout.txt; do
			[ -f "$h" ] || continue
			want=$("$O" tokenize "$m" --no-special --file "$h" 2>/dev/null) || continue
			got=$("$T" --no-add-special --no-parse-special "$m" -f "$h" 2>&1) || true
			if [ "$want" != "$got" ]; then
				echo "FAIL: $m on $h: the ids differ" >&2
				bad=$((bad + 1))
			fi
			checked=$((checked + 1))
		done
		echo "harness $(basename "$(dirname "$m")")/$(basename "$m"): $((n_texts * 3)) encodings and the held-out texts, $bad different"
		failed=$((failed + bad))
	done
elif [ $suites -eq 0 ]; then
	echo "SKIP: neither llama.cpp's vocabulary suites ($LLSRC/models) nor tests/llama-oracle"
	exit 77
fi

echo "tokenizer vs llama.cpp: $checked checked, $failed failed"
[ $failed -eq 0 ]
