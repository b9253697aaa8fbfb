#!/usr/bin/env bash
# The third data set (real drawings: Noto Color Emoji things composed into scenes, val and test in drawings training
# never shows; scripts/make_emoji_scenes.py) through every rerank mode with genret's own commands
# (scripts/rerank_bench.sh: a CLIP, the mini MLLM on its tower, zero-shot and LoRA rerank per mode, the table,
# fusion chosen on val).
#   scripts/emoji_bench.sh [work dir, default runs/emoji]   (needs: apt-get install fonts-noto-color-emoji)
# Settings: rerank_bench.sh's (MLLM_ARGS for the language model's size...).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/emoji}
[ -f "$out/data/dataset_emoji.json" ] || "$here/.venv/bin/python" "$here/scripts/make_emoji_scenes.py" "$out/data"
"$here/scripts/rerank_bench.sh" "$out/data" "$out"
