#!/usr/bin/env bash
# Remake the miniature world's shipped models (adapters/mini-world/): the mini CLIP, the mini MLLM and the
# LoRAs of the rewrite stages on it (CIReVL's rewriter, chat's questioner, EIIRwQR's rewriter; the recipes of
# docs/benchmarks.md). About 5 min (CLIP, 16 epochs) + 20-25 min (MLLM pretraining, 5 epochs) + 10 min
# (CIReVL rewriter, 4,000 steps) + 8 min (questioner) + 8 min (feedback rewriter) on 2 quiet CPU cores.
#   scripts/make_mini_world_models.sh [work dir, default runs/mini-world]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/mini-world}
genret() { "$here/run" genret "$@"; }
genret data synth "$out/world"
genret train clip --data "$out/world" --out "$out/clip" --epochs 16
genret train mllm --clip "$out/clip" --data "$out/world" --out "$out/mllm" --epochs 5
genret train rewriter --data "$out/world" --base "$out/mllm" --out "$out/rewriter" --reference-text both \
    --epochs 16 --lora-r 64 --lora-alpha 128 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
genret train rewriter --task chat --data "$out/world" --base "$out/mllm" --out "$out/questioner" --rounds 5 \
    --max-steps 600
genret train rewriter --task eiirwqr --data "$out/world" --base "$out/mllm" --clip "$out/clip" --out "$out/feedback"
"$here/.venv/bin/python" "$here/scripts/ship_mini_world.py" "$out" "$here/adapters/mini-world"
