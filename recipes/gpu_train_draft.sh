#!/usr/bin/env bash
# The shipped SmolLM2 draft's recipe: target-generated data, then train-draft, inside one fixed wall-time
# budget on one GPU (src/draftguide/models/smollm2-135m-dflash/MODEL_CARD.md says what it produced).
#   recipes/gpu_train_draft.sh PROMPTS.jsonl OUT_DIR [BUDGET_S]
# Data generation gets DATA_S seconds (make-data appends per batch, so a stop keeps what was generated);
# training gets the rest, its cosine schedule fitted to that time (--time-budget-minutes).
set -euo pipefail
PROMPTS=$1; OUT=$2; BUDGET=${3:-540}
DATA_S=${DATA_S:-190}; DEVICE=${DEVICE:-cuda}; TARGET=${TARGET:-smollm2-135m}
GEN_BATCH=${GEN_BATCH:-1024}; MAX_NEW=${MAX_NEW:-256}; TRAIN_BATCH=${TRAIN_BATCH:-64}; LAYERS=${LAYERS:-5}; BLOCK=${BLOCK:-8}
T0=$(date +%s)
DG="python3 -m draftguide"

timeout -s INT "$DATA_S" $DG make-data --target "$TARGET" --device "$DEVICE" --prompts "$PROMPTS" --out "$OUT/data" \
    --max-new-tokens "$MAX_NEW" --max-prompt-tokens 256 --batch-size "$GEN_BATCH" \
  || echo "make-data: stopped by its ${DATA_S}s limit; the samples written so far are kept"
wc -l "$OUT/data/samples.jsonl"

LEFT=$(( T0 + BUDGET - $(date +%s) - 30 ))  # 30 s for the final checkpoint and the saved draft
$DG train-draft --target "$TARGET" --device "$DEVICE" --data "$OUT/data" --out "$OUT/run" \
    --block-size "$BLOCK" --draft-layers "$LAYERS" --anchors-per-seq 64 --batch-size "$TRAIN_BATCH" --max-len 512 \
    --steps 1000000 --lr 6e-4 --vocab-subset 0 --checkpoint-every 0 --log-every 20 \
    --time-budget-minutes "$(python3 -c "print(max($LEFT, 30) / 60)")"
echo "recipe done in $(( $(date +%s) - T0 )) s"
