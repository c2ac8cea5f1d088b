#!/usr/bin/env bash
# `qatserve audit` beside `llama-perplexity --kl-divergence` on the same files (issue 7, acceptance):
# default model -> F16 reference (qatserve quantize), Q8_0 and Q4_0 PTQ of that F16, the licence corpus,
# -c 512 --chunks 20, 2 threads. Cases: Q8_0 and Q4_0 weights (F16 KV); q8_0 and q4_0 K/V on the F16
# weights, rotated (both tools' default) and plain (LLAMA_ATTN_ROT_DISABLE=1 / --no-kv-rotation).
# Each tool scores against its own F16 reference. Prints a markdown table of both tools' figures.
#
#   benchmarks/audit_vs_llamacpp.sh LLAMA_BIN_DIR [WORK_DIR] [CHUNKS]
#
# Needs ~8 GB of disk in WORK_DIR (two 2.7 GB reference files at 20 chunks). On the 2-core machine
# llama-perplexity takes ~3-5 min per case and qatserve audit ~5 min per weight case, ~10 min per KV
# case (~1.5 h in all); the tools run one at a time.
set -euo pipefail
BIN=${1:?llama.cpp bin directory (llama-perplexity)}
W=${2:-/tmp/qatserve-audit}
CHUNKS=${3:-20}
mkdir -p "$W"
Q=(python -m qatserve)
MODEL=$(python -c "from qatserve.default_model import default_model_path; print(default_model_path())")
CASES=(w-q8_0 w-q4_0 kv-q8_0 kv-q4_0 kv-q8_0-plain kv-q4_0-plain)

cat /usr/share/common-licenses/{GPL-3,Apache-2.0,GFDL-1.3,Artistic,MPL-2.0,LGPL-3} > "$W/corpus.txt"
"${Q[@]}" quantize "$MODEL" "$W/f16.gguf" F16
for t in q8_0 q4_0; do "${Q[@]}" quantize "$W/f16.gguf" "$W/$t.gguf" "$t"; done

# case name -> model file and K/V flags (both tools take -ctk/-ctv)
model_of() { case $1 in w-*) echo "$W/${1#w-}.gguf" ;; *) echo "$W/f16.gguf" ;; esac; }
kv_of() { case $1 in kv-*) t=${1#kv-}; t=${t%-plain}; echo "-ctk $t -ctv $t" ;; esac; }

nice "$BIN/llama-perplexity" -m "$W/f16.gguf" -f "$W/corpus.txt" -c 512 --chunks "$CHUNKS" -t 2 \
    --kl-divergence-base "$W/llama-f16.kld" > "$W/llama-base.log" 2>&1
for c in "${CASES[@]}"; do
    rot=0; [[ $c == *-plain ]] && rot=1
    # shellcheck disable=SC2046
    LLAMA_ATTN_ROT_DISABLE=$rot nice "$BIN/llama-perplexity" -m "$(model_of "$c")" $(kv_of "$c") \
        --kl-divergence-base "$W/llama-f16.kld" --kl-divergence -c 512 -t 2 > "$W/llama-$c.log" 2>&1
done

# The first qatserve case also scores the F16 reference and saves it for the others.
nice "${Q[@]}" audit -m "$W/q8_0.gguf" --ref "$W/f16.gguf" -f "$W/corpus.txt" -c 512 --chunks "$CHUNKS" -t 2 \
    --save-ref "$W/qatserve-f16.kld" > "$W/qatserve-w-q8_0.txt" 2> "$W/qatserve-w-q8_0.err"
for c in "${CASES[@]:1}"; do
    extra=(); [[ $c == *-plain ]] && extra=(--no-kv-rotation)
    # shellcheck disable=SC2046
    nice "${Q[@]}" audit -m "$(model_of "$c")" $(kv_of "$c") "${extra[@]}" --ref "$W/qatserve-f16.kld" -t 2 \
        > "$W/qatserve-$c.txt" 2> "$W/qatserve-$c.err"
done

val() { grep -m1 -F "$2" "$1" | sed 's/^[^:]*: *//' | awk '{print $1}'; }
echo "| case | mean KLD llama.cpp | qatserve | rel. | PPL ratio llama.cpp | qatserve | rel. | same top-1 % llama.cpp | qatserve | diff (pt) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for c in "${CASES[@]}"; do
    a=$W/llama-$c.log b=$W/qatserve-$c.txt
    awk -v c="$c" -v k1="$(val "$a" "Mean    KLD")" -v k2="$(val "$b" "Mean    KLD")" \
        -v r1="$(val "$a" "Mean PPL(Q)/PPL(base)")" -v r2="$(val "$b" "Mean PPL(Q)/PPL(base)")" \
        -v t1="$(val "$a" "Same top p:")" -v t2="$(val "$b" "Same top p:")" 'BEGIN {
        printf "| %s | %s | %s | %+.1f%% | %s | %s | %+.2f%% | %s | %s | %+.2f |\n",
               c, k1, k2, 100 * (k2 / k1 - 1), r1, r2, 100 * (r2 / r1 - 1), t1, t2, t2 - t1 }'
done
