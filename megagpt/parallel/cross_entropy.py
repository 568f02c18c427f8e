"""Cross-entropy over vocabulary-parallel logits, without ever gathering the [s, b, V] logits.

Each TP rank holds logits for its vocabulary slice [r*V/tp, (r+1)*V/tp). The loss needs three per-token
scalars that span the whole vocabulary: the max logit (for stability), the sum of exponentials, and the
logit of the target (which lives on exactly one rank). The max is all-reduced with MAX, the other two (plus,
with label smoothing, the sum of logits) are stacked into one SUM all-reduce. Communication per token is
therefore a few scalars instead of V/tp logits.

Everything is computed in fp32, also for bf16/fp16 logits. The backward is the closed form
`softmax - onehot(target)` on this rank's slice (no communication), scaled by the incoming gradient; the
normalisation by the sum of exponentials is folded into that scaling (one pass over the logits fewer).
"""
from __future__ import annotations

import torch

from megagpt.parallel import comm
from megagpt.parallel.mappings import tp_rank, tp_world_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing):
        # logits: [s, b, v/tp] (any float dtype), target: [s, b] global ids
        tp = tp_world_size(group)
        part = logits.size(-1)
        vocab = part * tp
        start = tp_rank(group) * part

        logits32 = logits.float()  # may alias the input for fp32: never modified in place below
        logits_max = logits32.amax(dim=-1)  # [s, b]
        if tp > 1:
            comm.all_reduce_max(logits_max, group)
        shifted = logits32 - logits_max.unsqueeze(-1)  # [s, b, v/tp], fresh tensor, <= 0

        outside = (target < start) | (target >= start + part)  # [s, b]: target owned by another rank
        local_target = (target - start).masked_fill(outside, 0)  # [s, b]
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [s, b]
        target_logit = target_logit.masked_fill(outside, 0.0)

        stats = [target_logit, None, None]
        if label_smoothing > 0:
            stats[2] = shifted.sum(dim=-1)  # [s, b], before exp_ overwrites shifted
        exp = shifted.exp_()  # [s, b, v/tp]
        stats[1] = exp.sum(dim=-1)  # [s, b]
        stats = torch.stack([t for t in stats if t is not None])  # [2 or 3, s, b]
        if tp > 1:
            comm.all_reduce(stats, group)
        target_logit, sum_exp = stats[0], stats[1]

        log_z = torch.log(sum_exp)  # [s, b]
        loss = log_z - target_logit  # [s, b], -log p(target)
        if label_smoothing > 0:
            # PyTorch's convention (F.cross_entropy): (1-eps) * nll + eps * mean over all V classes of -log p.
            mean_neg_log_p = log_z - stats[2] / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_log_p

        # exp / sum_exp is the softmax; the division is left to backward, where it joins the scaling by grad_loss
        ctx.save_for_backward(exp, sum_exp, outside, local_target)
        ctx.label_smoothing, ctx.vocab, ctx.input_dtype = label_smoothing, vocab, logits.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy backward reuses its saved exponentials in place and can "
                               "run only once (retain_graph double backward is not supported)")
        ctx.used = True
        exp, sum_exp, outside, local_target = ctx.saved_tensors
        g = grad_loss.float()  # [s, b]
        grad = exp.mul_((g / sum_exp).unsqueeze(-1))  # softmax * g, in place: saves one logits-sized buffer
        on_target = (1.0 - ctx.label_smoothing) * (~outside).to(grad.dtype) * g  # [s, b], 0 where not owned
        # subtract (1 - eps) * g at the target column owned by this rank
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -on_target.unsqueeze(-1))
        if ctx.label_smoothing > 0:
            grad.sub_((ctx.label_smoothing / ctx.vocab) * g.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, group,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy [s, b] (fp32) of logits split over TP along the vocabulary.

    vocab_parallel_logits: [s, b, v/tp] this rank's vocabulary slice; target: [s, b] global vocabulary ids.
    `label_smoothing` follows F.cross_entropy (the smoothed mass is spread over all V classes), so it needs
    finite logits; without it, -inf logits (masked vocabulary padding, even a whole shard) are fine.
    The input logits are not modified. The backward reuses the saved exponentials in place and runs once.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(vocab_parallel_logits.shape)} and target {tuple(target.shape)} "
                         "disagree on the leading dims")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group, float(label_smoothing))
