#!/usr/bin/env bash
# Remake the miniature world's shipped models (adapters/mini-world/), in the order they depend on each other:
# the world, the mini CLIP, the mini MLLM on its vision tower, a rerank LoRA and the LoRAs of the rewrite stages on that MLLM
# (CIReVL's rewriter, chat's questioner, EIIRwQR's rewriter; the recipes of docs/benchmarks.md), then ship.
# Resumable: a step whose output is finished (its genret.json is there) is skipped, a step cut short (its
# checkpoints are there) continues with --resume; run it again after an interruption. Each step shows progress.
# The same script runs on a GPU machine unchanged (device and dtype follow the defaults: bf16 where supported).
#   scripts/make_mini_world_models.sh [work dir, default runs/mini-world]
# MLLM_ARGS (environment) passes options to the MLLM's pretraining, e.g. "--hidden-size 256 --layers 4".
# On 2 CPU cores: CLIP ~47 + ~30 min (3,600 then 3,000 steps of 64 fresh images and their shape swaps), MLLM
# pretraining with the instruction mixture ~45 min (3 epochs), the rerank LoRA ~5 min, then 10 + 8 + 8 min for the
# three rewrite LoRAs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/mini-world}
genret() { "$here/run" genret "$@"; }

# step OUT CMD...: run CMD (which writes OUT) unless OUT is finished; continue a cut-short run.
step() {
  local dest=$1; shift
  if [ -f "$dest/genret.json" ]; then echo "done already: $dest" >&2; return; fi
  if compgen -G "$dest/checkpoints/*/trainer_state.json" >/dev/null; then "$@" --resume; else "$@"; fi
}

[ -f "$out/world/dataset_synth.json" ] || genret data synth "$out/world"
# The vision side must see shape: images drawn fresh every step (the generator is free), each with its shape swap
# as an in-batch hard negative, and linear heads naming every object's shape, colour and size on the tower; then
# the same again from there with every image turned by up to 20 degrees (val and test draw their objects turned
# 12-24 degrees, training 0-12: without the turn the shape probe reads the test scenes at 74%, drawn in the
# training style at 99%).
step "$out/clip-base" genret train clip --data "$out/world" --out "$out/clip-base" --fresh-images --shape-negatives \
    --attribute-weight 5 --batch-size 64 --max-steps 3600 --save-every 200 --eval-every 200 --log-every 100
step "$out/clip" genret train clip --data "$out/world" --out "$out/clip" --init "$out/clip-base" --fresh-images \
    --shape-negatives --attribute-weight 5 --augment-rotation 20 --batch-size 64 --max-steps 3000 --lr 5e-4 \
    --save-every 200 --eval-every 300 --log-every 100
# shellcheck disable=SC2086  # MLLM_ARGS: extra `genret train mllm` options (the language model's size, the mixture's)
step "$out/mllm" genret train mllm --clip "$out/clip" --data "$out/world" --out "$out/mllm" --epochs 3 \
    --augment-rotation 20 --save-every 200 ${MLLM_ARGS:-}
# The rerank LoRA the demo uses: generative (log P(caption | image)), the mode that judges zero-shot; 800 steps of
# 8 prefilter-mined query groups x 8 candidates (docs/benchmarks.md, "Rerank LoRAs on this base").
step "$out/rerank" genret train rerank --data "$out/world" --base "$out/mllm" --clip "$out/clip" --out "$out/rerank" \
    --mode generative --lr 3e-4 --max-steps 800 --eval-every 400 --save-every 200
step "$out/rewriter" genret train rewriter --data "$out/world" --base "$out/mllm" --out "$out/rewriter" \
    --reference-text both --epochs 16 --lora-r 64 --lora-alpha 128 \
    --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --save-every 500
step "$out/questioner" genret train rewriter --task chat --data "$out/world" --base "$out/mllm" \
    --out "$out/questioner" --rounds 5 --max-steps 600 --save-every 200
step "$out/feedback" genret train rewriter --task eiirwqr --data "$out/world" --base "$out/mllm" --clip "$out/clip" \
    --out "$out/feedback" --save-every 200
"$here/.venv/bin/python" "$here/scripts/ship_mini_world.py" "$out" "$here/adapters/mini-world"
