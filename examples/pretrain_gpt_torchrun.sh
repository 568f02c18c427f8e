#!/usr/bin/env bash
# Multi-node GPU pre-training with torchrun; run this on every node (same MASTER_ADDR, its own NODE_RANK):
#   MODEL=8.3b NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 DATA_PATH=data/corpus_text_document \
#   CHECKPOINT_DIR=ckpt/gpt-8.3b bash examples/pretrain_gpt_torchrun.sh [extra flags]
# Layouts per size are in examples/gpt_args.sh. Resumes from CHECKPOINT_DIR when it holds a checkpoint (else
# starts from scratch); SIGTERM to torchrun makes every rank save and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-124m}
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/gpt-$MODEL}
# shellcheck disable=SC2046  # the flags are meant to split into words
exec python -m torch.distributed.run --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${GPUS_PER_NODE:-8}" --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" examples/pretrain_gpt.py $(bash examples/gpt_args.sh "$MODEL") \
  --data-path "$DATA_PATH" --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --exit-signal-handler \
  --tensorboard-dir "runs/gpt-$MODEL" "$@"
