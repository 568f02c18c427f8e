#!/usr/bin/env bash
# Prints the pretrain_gpt.py flags of one model size for a GPU cluster (used by pretrain_gpt_torchrun.sh and
# pretrain_gpt.sbatch; tests/test_examples.py validates each against its intended world size).
#   bash examples/gpt_args.sh 124m|1.3b|8.3b
# Sizes and layouts (world size = nodes x 8 GPUs):
#   124m   GPT-2 small       1 node,  TP=1 PP=1 DP=8
#   1.3b   GPT-3 XL shape    2 nodes, TP=2 PP=1 DP=8, sequence parallel
#   8.3b   Megatron 8.3B     8 nodes, TP=8 PP=2 DP=4, interleaved (2 chunks), sequence parallel, recompute
set -euo pipefail
case "${1:?model size: 124m, 1.3b or 8.3b}" in
  124m) echo "--model-size gpt2-124m --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1" \
             "--micro-batch-size 16 --global-batch-size 512 --lr 6e-4 --min-lr 6e-5 --train-iters 600000" ;;
  1.3b) echo "--model-size gpt-1.3b --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1" \
             "--sequence-parallel --micro-batch-size 8 --global-batch-size 512 --lr 2e-4 --min-lr 2e-5" \
             "--train-iters 300000" ;;
  8.3b) echo "--model-size megatron-8.3b --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2" \
             "--num-layers-per-virtual-pipeline-stage 18 --sequence-parallel --recompute-activations" \
             "--micro-batch-size 4 --global-batch-size 512 --lr 1.5e-4 --min-lr 1e-5 --train-iters 300000" ;;
  *) echo "unknown model size $1 (124m, 1.3b or 8.3b)" >&2; exit 2 ;;
esac
# Shared by every size: GPT-2 context and tokenizer, bf16, ZeRO-1, cosine decay, Megatron-style cadence.
echo "--seq-length 1024 --max-position-embeddings 1024 --tokenizer-type GPT2BPETokenizer --bf16" \
     "--use-distributed-optimizer --overlap-grad-reduce --lr-warmup-iters 2000 --lr-decay-style cosine" \
     "--weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --split 969,30,1 --log-interval 10" \
     "--eval-interval 1000 --eval-iters 10 --save-interval 1000"
