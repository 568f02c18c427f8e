"""Fused softmax CUDA kernels (forward and backward) vs an fp32 PyTorch reference, on random shapes up to the limits.

Runs only on a CUDA machine (the extension is JIT-built on first use); elsewhere every test is skipped with the
reason shown by `pytest -ra`. Error bounds: relative error under 1e-3 for fp16 and 1e-2 for bf16 (forward
elementwise with the dtype's subnormal spacing as absolute floor; backward normwise, since the grad subtracts
nearly equal numbers).
"""
import random

import pytest
import torch

from megagpt.model.softmax import MAX_KEY_LENGTH, FusedScaleMaskSoftmax, is_available, unavailable_reason

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(
        reason=f"CUDA not available (torch {torch.__version__}, CUDA build {torch.version.cuda}): GPU kernel tests")

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEV = "cuda"


def reference_fp32(scores, mask, scale, causal):
    """fp32 softmax of the same 16-bit scores, written out: masked -> 0, rows with no visible key -> 0."""
    x = scores.float() * scale
    sq, sk = x.shape[-2:]
    hidden = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if mask is not None:
        hidden = hidden | mask
    if causal:
        i = torch.arange(sq, device=x.device).view(sq, 1)
        j = torch.arange(sk, device=x.device).view(1, sk)
        hidden = hidden | (j > i + (sk - sq))
    x = x.masked_fill(hidden, float("-inf"))
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    e = torch.exp(x - row_max) * (~hidden)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def assert_forward_close(probs, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(probs.float(), ref, rtol=tol, atol=torch.finfo(dtype).tiny * tol)


def normwise_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run_case(dtype, kind, b, h, sq, sk, mask_shape, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = (torch.randn(b, h, sq, sk, device=DEV, generator=g) * 3).to(dtype).requires_grad_()
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, device=DEV, generator=g) < 0.3
    scale = 0.125
    module = FusedScaleMaskSoftmax(kind, scale)
    assert module.fused_unavailable_reason(scores, mask) is None
    probs = module(scores, mask)
    assert probs.dtype == dtype and probs.shape == scores.shape

    leaf = scores.detach().float().requires_grad_()
    ref = reference_fp32(leaf, mask, scale, kind == "causal")
    assert_forward_close(probs, ref.detach(), dtype)

    dy = torch.randn(b, h, sq, sk, device=DEV, generator=g).to(dtype)
    probs.backward(dy)
    ref.backward(dy.float())
    # Long rows make fp16 grads subnormal: allow what storing the reference itself in `dtype` would lose.
    storage_error = normwise_error(leaf.grad.to(dtype), leaf.grad)
    assert normwise_error(scores.grad, leaf.grad) < TOL[dtype] + storage_error
    # same formula on the kernel's own probs: only the final rounding may differ
    y, d = probs.detach().float(), dy.float()
    expected = scale * y * (d - (d * y).sum(-1, keepdim=True))
    atol = torch.finfo(dtype).tiny * TOL[dtype] + TOL[dtype] * 1e-2 * expected.abs().max().item()
    torch.testing.assert_close(scores.grad.float(), expected, rtol=TOL[dtype], atol=atol)


def test_extension_builds():
    assert is_available(), unavailable_reason()


LIMIT_KEYS = [1, 17, 32, 34, 64, 100, 128, 136, 256, 1000, 2048, 4096, 8192, MAX_KEY_LENGTH]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["causal", "padding"])
@pytest.mark.parametrize("sk", LIMIT_KEYS)
def test_key_length_classes(dtype, kind, sk):
    sq = sk if sk <= 256 else 24
    mask_shape = (2, 1, 1, sk) if kind == "padding" else None
    run_case(dtype, kind, 2, 3, sq, sk, mask_shape, seed=sk)


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes(seed):
    rnd = random.Random(seed)
    dtype = rnd.choice([torch.float16, torch.bfloat16])
    kind = rnd.choice(["causal", "padding"])
    sk = rnd.choice([rnd.randint(1, 32), 2 * rnd.randint(17, 32), 4 * rnd.randint(17, 32), 8 * rnd.randint(17, 2048)])
    b, h = rnd.randint(1, 3), rnd.randint(1, 5)
    sq = rnd.randint(1, min(sk + 8, 96))
    mask_shape = rnd.choice([None, (b, 1, 1, sk), (b, 1, sq, sk), (b, h, sq, sk), (sq, sk), (b, 1, sq, 1)])
    run_case(dtype, kind, b, h, sq, sk, mask_shape, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_causal_square_at_the_limit(dtype):
    run_case(dtype, "causal", 1, 1, MAX_KEY_LENGTH, MAX_KEY_LENGTH, None, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fully_masked_rows_are_zero(dtype):
    scores = torch.randn(2, 2, 8, 64, device=DEV, dtype=dtype, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 64, dtype=torch.bool, device=DEV)
    mask[0, 0, 3] = True
    probs = FusedScaleMaskSoftmax("padding", 0.5)(scores, mask)
    assert torch.equal(probs[0, :, 3], torch.zeros_like(probs[0, :, 3])) and not probs.isnan().any()
    probs.backward(torch.randn_like(probs))
    assert torch.isfinite(scores.grad).all()
    causal = FusedScaleMaskSoftmax("causal", None)(torch.randn(1, 1, 40, 32, device=DEV, dtype=dtype))
    assert torch.equal(causal[0, 0, :8], torch.zeros(8, 32, device=DEV, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_contiguous_and_misaligned_views(dtype):
    base = torch.randn(1, 3, 128, 2, 40, device=DEV).to(dtype)
    scores = base[..., 0, :].transpose(2, 3)  # [1, 3, 40, 128], strided
    module = FusedScaleMaskSoftmax("padding", 0.3)
    assert_forward_close(module(scores, None), reference_fp32(scores, None, 0.3, False), dtype)
    flat = torch.randn(1 + 2 * 4 * 16 * 256, device=DEV).to(dtype)
    shifted = flat[1:].view(2, 4, 16, 256)  # data pointer 2 bytes past an allocation boundary
    assert_forward_close(module(shifted, None), reference_fp32(shifted, None, 0.3, False), dtype)


def test_kernel_agrees_with_pytorch_path():
    scores = torch.randn(2, 4, 128, 128, device=DEV, dtype=torch.bfloat16)
    fused = FusedScaleMaskSoftmax("causal", 0.1)(scores)
    eager = FusedScaleMaskSoftmax("causal", 0.1, masked_softmax_fusion=False)(scores)
    assert normwise_error(fused, eager) < 1e-2


def test_dispatcher_reasons_on_cuda():
    module = FusedScaleMaskSoftmax("causal", None)
    assert module.fused_unavailable_reason(torch.zeros(1, 1, 2, 20000, device=DEV, dtype=torch.float16)) == \
        "key length 20000 > 16384"
    assert module.fused_unavailable_reason(torch.zeros(1, 1, 2, 8, device=DEV)) == "dtype float32 not fp16/bf16"
    assert module.fused_unavailable_reason(torch.zeros(1, 1, 2, 8, device=DEV, dtype=torch.float16)) is None
