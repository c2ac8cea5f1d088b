#!/usr/bin/env bash
# `qatserve audit` beside `llama-perplexity --kl-divergence` on the same files (issue 7, acceptance):
# default model -> F16 reference (qatserve quantize), Q8_0 and Q4_0 PTQ of that F16, the licence corpus,
# -c 512 --chunks 20, 2 threads. Prints both tools' summary lines side by side.
#
#   benchmarks/audit_vs_llamacpp.sh LLAMA_BIN_DIR [WORK_DIR] [CHUNKS]
#
# Needs ~8 GB of disk in WORK_DIR (two 2.7 GB reference files at 20 chunks). On the 2-core machine
# each tool takes ~4 min (llama.cpp) / ~12 min (qatserve, which also scores the reference) per type.
set -euo pipefail
BIN=${1:?llama.cpp bin directory (llama-perplexity)}
W=${2:-/tmp/qatserve-audit}
CHUNKS=${3:-20}
mkdir -p "$W"
Q="python -m qatserve"
MODEL=$(python -c "from qatserve.default_model import default_model_path; print(default_model_path())")

cat /usr/share/common-licenses/{GPL-3,Apache-2.0,GFDL-1.3,Artistic,MPL-2.0,LGPL-3} > "$W/corpus.txt"
$Q quantize "$MODEL" "$W/f16.gguf" F16
for t in q8_0 q4_0; do $Q quantize "$W/f16.gguf" "$W/$t.gguf" "$t"; done

nice "$BIN/llama-perplexity" -m "$W/f16.gguf" -f "$W/corpus.txt" -c 512 --chunks "$CHUNKS" -t 2 \
    --kl-divergence-base "$W/llama-f16.kld" > "$W/llama-base.log" 2>&1
for t in q8_0 q4_0; do
    nice "$BIN/llama-perplexity" -m "$W/$t.gguf" --kl-divergence-base "$W/llama-f16.kld" --kl-divergence \
        -c 512 -t 2 > "$W/llama-$t.log" 2>&1
done

nice $Q audit -m "$W/q8_0.gguf" --ref "$W/f16.gguf" -f "$W/corpus.txt" -c 512 --chunks "$CHUNKS" -t 2 \
    --save-ref "$W/qatserve-f16.kld" > "$W/qatserve-q8_0.txt" 2> "$W/qatserve-q8_0.err"
nice $Q audit -m "$W/q4_0.gguf" --ref "$W/qatserve-f16.kld" -t 2 > "$W/qatserve-q4_0.txt" 2> "$W/qatserve-q4_0.err"

for t in q8_0 q4_0; do
    echo "== $t: llama-perplexity | qatserve audit"
    for key in "Mean PPL(Q) " "Mean PPL(base) " "Mean PPL(Q)/PPL(base)" "Mean    KLD" "Median  KLD" \
               "99.0%   KLD" "Maximum KLD" "RMS Δp" "Same top p:"; do
        a=$(grep -m1 -F "$key" "$W/llama-$t.log" | sed 's/^.*: *//')
        b=$(grep -m1 -F "$key" "$W/qatserve-$t.txt" | sed 's/^.*: *//')
        printf '%-24s %-28s %s\n' "$key" "$a" "$b"
    done
done
