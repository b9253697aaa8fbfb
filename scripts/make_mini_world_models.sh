#!/usr/bin/env bash
# Remake the miniature world's shipped models (adapters/mini-world/): world, mini CLIP, mini MLLM.
# About 6 min (CLIP) + 20-25 min (MLLM pretraining, 6 epochs) on 2 CPU cores.
set -euo pipefail
out=${1:-runs/mini-world}
genret() { "$(dirname "$0")/../run" genret "$@"; }
genret data synth "$out/world"
genret train clip --data "$out/world" --out "$out/clip" --epochs 16
genret train mllm --clip "$out/clip" --data "$out/world" --out "$out/mllm" --epochs 6
echo "now copy $out/mllm to adapters/mini-world/mllm"
