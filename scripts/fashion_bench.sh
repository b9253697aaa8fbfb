#!/usr/bin/env bash
# The second data set (real images: Fashion-MNIST items composed into scenes, scripts/make_fashion_scenes.py) run
# through genret's own commands, as any user's Karpathy data set would be: a CLIP, the mini MLLM on its tower,
# zero-shot rerank, and a rerank LoRA; the table is scripts/rerank_table.py's (prefilter, zero-shot, LoRA).
# Resumable: a finished step (its genret.json is there) is skipped, a cut one continues with --resume.
#   scripts/fashion_bench.sh [work dir, default runs/fashion]   (needs: apt-get install dataset-fashion-mnist)
# On 2 CPU cores: data 10 s, CLIP ~15 min, MLLM ~50 min, LoRA ~15 min, the table ~15 min.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/fashion}
genret() { "$here/run" genret "$@"; }
py="$here/.venv/bin/python"

step() {
  local dest=$1; shift
  if [ -f "$dest/genret.json" ]; then echo "done already: $dest" >&2; return; fi
  if compgen -G "$dest/checkpoints/*/trainer_state.json" >/dev/null; then "$@" --resume; else "$@"; fi
}

[ -f "$out/data/dataset_fashion.json" ] || "$py" "$here/scripts/make_fashion_scenes.py" "$out/data"
step "$out/clip" genret train clip --data "$out/data" --out "$out/clip" --epochs 40 --batch-size 64 \
    --augment-rotation 20 --save-every 200
step "$out/mllm" genret train mllm --clip "$out/clip" --data "$out/data" --out "$out/mllm" --epochs 3 \
    --augment-rotation 20 --save-every 500
step "$out/rerank-lora" genret train rerank --base "$out/mllm" --clip "$out/clip" --data "$out/data" \
    --out "$out/rerank-lora" --mode generative --max-steps 800 --save-every 200
"$py" "$here/scripts/rerank_table.py" --clip "$out/clip" --mllm "$out/mllm" --data "$out/data" \
    --variant zero-shot-generative:generative:10 --variant zero-shot-pointwise:pointwise:10 \
    --variant zero-shot-listwise:listwise:10 --variant lora-generative:generative:10:"$out/rerank-lora"
