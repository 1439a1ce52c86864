#!/usr/bin/env bash
# The whole job offline on a CPU in about 5 minutes (2 cores): a synthetic teacher dataset, the untrained
# student graded, distillation, the student graded again (greedy, then sampled with error bars), and the charts.
#     bash walkthrough.sh [OUT_DIR]      (default: demo)
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-demo}"
# <!-- walkthrough -->
python data.py synth --out "$out"
python evaluate.py generate --model tiny --which_model base --data_path "$out/test.json" --max_new_tokens 64 \
    --out "$out/before.jsonl"
python train.py --model tiny --which_model base --data_path "$out/train.json" --out_dir "$out/run" \
    --epochs 8 --lr 1e-2 --lr_schedule cosine --warmup_steps 50 --grad_clip 1.0 --batch_size 8 \
    --validation_size 50 --log_every 200 --against "$out/test.json"
python evaluate.py generate --checkpoint_path "$out/run" --data_path "$out/test.json" --max_new_tokens 64 \
    --out "$out/after.jsonl"
python evaluate.py generate --checkpoint_path "$out/run" --data_path "$out/test.json" --max_new_tokens 64 \
    --preset thinking --num_samples 4 --out "$out/sampled.jsonl"
python plot.py loss "$out/run/metrics.csv" --out "$out/loss.png"
python plot.py accuracy "$out/before.summary.json" "$out/after.summary.json" "$out/sampled.summary.json" \
    --labels untrained distilled "distilled, sampled" --out "$out/accuracy.png"
python plot.py lengths "$out/after.jsonl" "$out/sampled.jsonl" --labels greedy sampled --out "$out/lengths.png"
# <!-- /walkthrough -->
