#!/usr/bin/env bash
# Every rerank mode on one Karpathy-format data set, through genret's own commands as any user's data set would go:
# a CLIP, the mini MLLM on its tower (the instruction mixture), zero-shot pointwise / listwise / generative rerank,
# a rerank LoRA per mode, then scripts/rerank_table.py's table (prefilter, each zero-shot, each LoRA; test split,
# CLIP's top 10) and the fusion weight per LoRA chosen on val (scripts/fusion_sweep.py).
# Resumable: a finished step (its genret.json is there) is skipped, a cut one continues with --resume.
#   scripts/rerank_bench.sh DATA WORK
# Settings (environment): CLIP_EPOCHS (40), MLLM_ARGS (extra `genret train mllm` options: the language model's
# size, e.g. "--hidden-size 256 --layers 4", and the mixture's), MLLM_EPOCHS (3), LORA_STEPS (800),
# TABLE_QUERIES (0: the whole test split). The scripts that make a data set call this (fashion_bench.sh,
# emoji_bench.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${1:?usage: rerank_bench.sh DATA WORK}
out=${2:?usage: rerank_bench.sh DATA WORK}
genret() { "$here/run" genret "$@"; }
py="$here/.venv/bin/python"

step() {
  local dest=$1; shift
  if [ -f "$dest/genret.json" ]; then echo "done already: $dest" >&2; return; fi
  if compgen -G "$dest/checkpoints/*/trainer_state.json" >/dev/null; then "$@" --resume; else "$@"; fi
}

step "$out/clip" genret train clip --data "$data" --out "$out/clip" --epochs "${CLIP_EPOCHS:-40}" --batch-size 64 \
    --augment-rotation 20 --save-every 200
# shellcheck disable=SC2086  # MLLM_ARGS is a list of options
step "$out/mllm" genret train mllm --clip "$out/clip" --data "$data" --out "$out/mllm" --epochs "${MLLM_EPOCHS:-3}" \
    --augment-rotation 20 --save-every 200 ${MLLM_ARGS:-}
variants=(--variant zero-shot-generative:generative:10 --variant zero-shot-pointwise:pointwise:10
          --variant zero-shot-listwise:listwise:10)
for mode in generative pointwise listwise; do
  step "$out/lora-$mode" genret train rerank --base "$out/mllm" --clip "$out/clip" --data "$data" \
      --out "$out/lora-$mode" --mode "$mode" --max-steps "${LORA_STEPS:-800}" --save-every 200
  variants+=(--variant "lora-$mode:$mode:10:$out/lora-$mode")
done
# The tables are written next to the models (table.md; fusion-MODE.json) and made again on each call.
"$py" "$here/scripts/rerank_table.py" --clip "$out/clip" --mllm "$out/mllm" --data "$data" \
    --queries "${TABLE_QUERIES:-0}" "${variants[@]}" | tee "$out/table.md.tmp"
mv "$out/table.md.tmp" "$out/table.md"
for mode in generative pointwise listwise; do
  "$py" "$here/scripts/fusion_sweep.py" --clip "$out/clip" --mllm "$out/mllm" --data "$data" --mode "$mode" \
      --adapter "$out/lora-$mode" --json > "$out/fusion-$mode.json.tmp"
  mv "$out/fusion-$mode.json.tmp" "$out/fusion-$mode.json"
  "$py" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], "w =", r["weight"], "(chosen on val); test R@1 t2i, i2t:",
    {k: (v["t2i"]["R@1"], v["i2t"]["R@1"]) for k, v in r["report"].items()})' "$out/fusion-$mode.json" "$mode"
done
