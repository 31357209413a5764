#!/usr/bin/env bash
# Fine-tune a LLaMA-Adapter (K=10, all 30 layers) on SmolLM2-135M-Instruct with the 999 Alpaca demo
# examples, on CPU, then compare an answer before and after. STEPS=0 trains the full schedule.
# Running it again starts a fresh run in $OUT (--overwrite); `finetune ... --resume` continues one instead.
# Examples are packed into rows (no padding) and none is cut: the log says "0 truncated" (the longest
# example has 755 tokens with the Alpaca template; --max-len defaults to the model's context).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/alpaca_smollm2}
DATA=${DATA:-../shared/data/alpaca/alpaca_en_demo.json}
STEPS=${STEPS:-30}
EXTRA=()
[ "$STEPS" != 0 ] && EXTRA+=(--max-steps "$STEPS")
.venv/bin/llama-adapter finetune --model smollm2-135m-instruct --data "$DATA" --out "$OUT" \
  --template alpaca --adapter-len 10 --adapter-layers 30 --epochs 1 --warmup-steps 10 --lr 5e-3 \
  --batch-size 4 --save-every 15 --max-val-examples 24 --eval-every 15 --overwrite "${EXTRA[@]}"
Q="Give three tips for staying healthy."
echo "--- base model (alpaca template, no adapter):"
.venv/bin/llama-adapter generate --model smollm2-135m-instruct --template alpaca --prompt "$Q" --max-new-tokens 80
echo "--- with the adapter:"
.venv/bin/llama-adapter generate --model smollm2-135m-instruct --adapter "$OUT" --prompt "$Q" --max-new-tokens 80
