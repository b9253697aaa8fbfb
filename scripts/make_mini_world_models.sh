#!/usr/bin/env bash
# Remake the miniature world's shipped models (adapters/mini-world/): the mini CLIP and the mini MLLM.
# About 5 min (CLIP, 16 epochs) + 20-25 min (MLLM pretraining, 5 epochs) on 2 quiet CPU cores.
#   scripts/make_mini_world_models.sh [work dir, default runs/mini-world]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/mini-world}
genret() { "$here/run" genret "$@"; }
genret data synth "$out/world"
genret train clip --data "$out/world" --out "$out/clip" --epochs 16
genret train mllm --clip "$out/clip" --data "$out/world" --out "$out/mllm" --epochs 5
"$here/.venv/bin/python" "$here/scripts/ship_mini_world.py" "$out" "$here/adapters/mini-world"
