#!/usr/bin/env bash
# The training engine's throughput in one process, two processes and with accumulation, on the same 300-step
# GRACE run (16 rows a step every way); prints each run's steps/s and its last logged loss.
#   scripts/bench_engine.sh WORLD_DIR   (a miniature world: genret data synth, or the demo's demo-out/world)
set -euo pipefail
world=${1:?usage: scripts/bench_engine.sh WORLD_DIR}
out=$(mktemp -d)
A="train grace --data $world --base adapters/mini-world/mllm --clip adapters/mini-world/clip --scheme atomic
   --max-steps 300 --lr 2e-3 --token-lr 1e-2 --eval-queries 50 --save-every 0 --caption-tokens 16 --json"
run() { local name=$1; shift; /usr/bin/time -f "$name wall %e s" "$@" > "$out/$name.json"; }
run one    ./run genret -q $A --out "$out/one" --batch-size 16 --threads 2
run accum  ./run genret -q $A --out "$out/accum" --batch-size 8 --gradient-accumulation-steps 2 --threads 2
OMP_NUM_THREADS=1 run two .venv/bin/torchrun --standalone --nproc_per_node 2 -m genret.cli -q $A --out "$out/two" \
  --batch-size 8 --threads 1
for name in one accum two; do
  .venv/bin/python -c "import json,sys; m=json.load(open(sys.argv[1])); s=m['speed']; \
print(f\"{sys.argv[2]:6s} steps/s {s['steps_per_s']:.2f}  rows/step {s['rows_per_step']}  processes {s['processes']}  \
last loss {m['metrics']['loss_last']}\")" "$out/$name/genret.json" "$name"
done
