#!/usr/bin/env bash
# The second data set (real images: Fashion-MNIST items composed into scenes, scripts/make_fashion_scenes.py) through
# every rerank mode with genret's own commands, as any user's Karpathy data set would go (scripts/rerank_bench.sh:
# a CLIP, the mini MLLM on its tower, zero-shot and LoRA rerank per mode, the table, fusion chosen on val).
#   scripts/fashion_bench.sh [work dir, default runs/fashion]   (needs: apt-get install dataset-fashion-mnist)
# Settings: rerank_bench.sh's (MLLM_ARGS for the language model's size...). On 2 CPU cores at today's size: data
# 10 s, CLIP ~15 min, MLLM ~50 min, each LoRA ~15 min, the table ~30 min.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/fashion}
[ -f "$out/data/dataset_fashion.json" ] || "$here/.venv/bin/python" "$here/scripts/make_fashion_scenes.py" "$out/data"
"$here/scripts/rerank_bench.sh" "$out/data" "$out"
