"""FusedScaleMaskSoftmax on CPU: PyTorch path vs a float64 reference, dispatcher reasons, the CUDA kernels' logic
run through the host warp emulator (csrc/fused_softmax/host_emulation.cpp), and the nvcc compile check."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megagpt.model import softmax as softmax_mod
from megagpt.model.softmax import (MAX_KEY_LENGTH, FusedScaleMaskSoftmax, is_available, kernel_key_length_reason,
                                   kernel_vector_width, unavailable_reason)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "fused_softmax"


def reference(scores, mask=None, scale=None, causal=False):
    """float64 softmax written out (no torch.softmax): masked -> 0, rows with no visible key -> all 0."""
    x = scores.double() * (1.0 if scale is None else scale)
    sq, sk = x.shape[-2], x.shape[-1]
    hidden = torch.zeros(x.shape, dtype=torch.bool)
    if mask is not None:
        hidden = hidden | mask
    if causal:
        i = torch.arange(sq).view(sq, 1)
        j = torch.arange(sk).view(1, sk)
        hidden = hidden | (j > i + (sk - sq))
    x = x.masked_fill(hidden, float("-inf"))
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(x - row_max.detach()) * (~hidden)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def tolerances(dtype):
    """(rtol, atol): one rounding of the output dtype, with its subnormal spacing as the absolute floor."""
    if dtype == torch.float32:
        return 1e-6, 1e-9
    rtol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    return rtol, torch.finfo(dtype).tiny * rtol


def random_mask(shape, seed, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


# ---------------------------------------------------------------- PyTorch path vs float64 reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softmax_in_fp32", [True, False])
@pytest.mark.parametrize("scale", [None, 0.125])
@pytest.mark.parametrize("sq,sk", [(8, 8), (5, 11), (9, 4)])
def test_causal_fallback_matches_reference(dtype, softmax_in_fp32, scale, sq, sk):
    scores = (torch.randn(2, 3, sq, sk, generator=torch.Generator().manual_seed(sq * sk)) * 4).to(dtype)
    module = FusedScaleMaskSoftmax("causal", scale, softmax_in_fp32=softmax_in_fp32)
    out = module(scores, None)
    assert out.dtype == dtype and out.shape == scores.shape
    ref_in = scores
    if not softmax_in_fp32 and scale is not None:
        ref_in = scores * scale  # without the fp32 upcast the scaling itself is rounded to the input dtype
    ref = reference(ref_in, None, None if ref_in is not scores else scale, causal=True)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7), (2, 1, 6, 7), (6, 7), (2, 3, 6, 7), (1, 3, 1, 7)])
def test_padding_fallback_matches_reference(dtype, mask_shape):
    scores = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = random_mask(mask_shape, seed=len(mask_shape))
    out = FusedScaleMaskSoftmax("padding", 0.7)(scores, mask)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out.double(), reference(scores, mask, 0.7), rtol=rtol, atol=atol)


def test_causal_plus_explicit_mask_applies_both():
    scores = torch.randn(2, 2, 5, 5)
    mask = random_mask((2, 1, 1, 5), seed=3)
    out = FusedScaleMaskSoftmax("causal", None)(scores, mask)
    torch.testing.assert_close(out.double(), reference(scores, mask, causal=True), rtol=1e-6, atol=1e-9)


def test_padding_without_mask_is_scaled_softmax():
    scores = torch.randn(1, 2, 3, 9)
    out = FusedScaleMaskSoftmax("padding", 2.0)(scores)
    torch.testing.assert_close(out, torch.softmax(scores.double() * 2.0, -1).float(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_rows_are_zero_with_finite_grads(dtype):
    scores = torch.randn(2, 2, 4, 6).to(dtype).requires_grad_()
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 1] = True  # one query row sees nothing
    mask[1, 0, :, 2:] = True
    out = FusedScaleMaskSoftmax("padding", 0.5)(scores, mask)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert not torch.isnan(out).any()
    (out.float() * torch.randn(out.shape)).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.equal(scores.grad[0, :, 1], torch.zeros(2, 6, dtype=dtype))
    # causal with sq > sk: the first sq - sk rows see no key
    out = FusedScaleMaskSoftmax("causal", None)(torch.randn(1, 1, 6, 2).to(dtype))
    assert torch.equal(out[0, 0, :4], torch.zeros(4, 2, dtype=dtype)) and not torch.isnan(out).any()


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("kind,sq,sk", [("causal", 4, 4), ("causal", 3, 6), ("causal", 5, 3), ("padding", 4, 5)])
def test_backward_gradcheck_float64(kind, sq, sk):
    mask = random_mask((2, 1, sq, sk), seed=7) if kind == "padding" else None
    if mask is not None:
        mask[0, 0, 0] = True  # include a fully masked row
    module = FusedScaleMaskSoftmax(kind, 0.3)
    scores = torch.randn(2, 2, sq, sk, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: module(s, mask), (scores,))
    # ... and the analytic form the kernel implements: grad = scale * y * (dy - sum(dy * y))
    y = module(scores, mask)
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, scores, dy)
    expected = 0.3 * y * (dy - (dy * y).sum(-1, keepdim=True))
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["causal", "padding"])
def test_bf16_backward_close_to_float64(kind):
    scores = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = random_mask((2, 1, 1, 8), seed=9) if kind == "padding" else None
    dy = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    low = scores.bfloat16().requires_grad_()
    FusedScaleMaskSoftmax(kind, 0.5)(low, mask).backward(dy.bfloat16())
    high = low.detach().double().requires_grad_()
    reference(high, mask, 0.5, causal=kind == "causal").backward(dy.bfloat16().double())
    err = (low.grad.double() - high.grad).abs().max() / high.grad.abs().max()
    assert err < 1e-2, err


# ---------------------------------------------------------------- dispatcher
def test_dispatcher_names_the_reason():
    causal = FusedScaleMaskSoftmax("causal", 0.125)
    x = torch.randn(1, 2, 16, 16)
    assert causal.fused_unavailable_reason(x.bfloat16(), None) == "input is on cpu"
    assert causal.fused_unavailable_reason(x, None) == "dtype float32 not fp16/bf16"
    assert causal.fused_unavailable_reason(torch.zeros(1, 1, 2, 20000, dtype=torch.float16)) == \
        "key length 20000 > 16384"
    assert "not a multiple of 8" in causal.fused_unavailable_reason(torch.zeros(1, 1, 2, 1001, dtype=torch.bfloat16))
    assert "3-D" in causal.fused_unavailable_reason(torch.zeros(2, 16, 16, dtype=torch.bfloat16))
    off = FusedScaleMaskSoftmax("causal", 0.125, masked_softmax_fusion=False)
    assert off.fused_unavailable_reason(x.bfloat16()) == "disabled by --no-masked-softmax-fusion"


def test_cpu_path_touches_no_cuda(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("CUDA touched on a CPU path")

    monkeypatch.setattr(softmax_mod._EXTENSION, "get", boom)
    for name in ("is_available", "current_device", "device_count", "_lazy_init", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, boom)
    scores = torch.randn(2, 2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    for module in (FusedScaleMaskSoftmax("causal", 0.5), FusedScaleMaskSoftmax("padding", None)):
        module(scores, torch.zeros(2, 1, 1, 8, dtype=torch.bool)).float().sum().backward()


def test_extension_unavailable_on_cpu_torch_says_why():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA: the extension may build here")
    assert not is_available()
    assert "without CUDA" in unavailable_reason()


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="causal"):
        FusedScaleMaskSoftmax("bidirectional", None)
    module = FusedScaleMaskSoftmax("padding", None)
    with pytest.raises(TypeError, match="bool"):
        module(torch.randn(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="broadcast"):
        module(torch.randn(1, 1, 2, 4), torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is on meta"):
        module(torch.randn(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.bool, device="meta"))


def test_limits_agree_with_kernel_header():
    header = (CSRC / "softmax_common.cuh").read_text()
    assert f"constexpr int kMaxKeyLength = {MAX_KEY_LENGTH};" in header
    assert [kernel_vector_width(s) for s in (1, 32, 33, 64, 65, 128, 129, 16384)] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert kernel_key_length_reason(16384) is None and kernel_key_length_reason(17) is None
    assert kernel_key_length_reason(33) is not None and kernel_key_length_reason(0) is not None


# ---------------------------------------------------------------- the CUDA kernels, run by the host emulator
@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel emulator")
    lib_path = tmp_path_factory.mktemp("fused_softmax_emu") / "libemu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror",
           f"-I{CSRC}", str(CSRC / "host_emulation.cpp"), "-o", str(lib_path)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    lib = ctypes.CDLL(str(lib_path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.emu_softmax_forward.argtypes = [i32, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, i32, ctypes.c_float, i32]
    lib.emu_softmax_backward.argtypes = [i32, ptr, ptr, ptr, i64, i32, i32, i32, ctypes.c_float, i32]
    return lib


def emu_forward(lib, scores, mask, scale, causal):
    b, h, sq, sk = scores.shape
    out = torch.full_like(scores, float("nan"))
    strides, mask_ptr = (0, 0, 0), None
    if mask is not None:
        mask = mask.expand(scores.shape)
        strides = tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(3))
        mask_ptr = mask.data_ptr()
    rc = lib.emu_softmax_forward(0 if scores.dtype == torch.float16 else 1, out.data_ptr(), scores.data_ptr(),
                                 mask_ptr, *strides, b * h * sq, h, sq, sk, scale, int(causal))
    return rc, out


def emu_backward(lib, dy, y, scale, causal):
    b, h, sq, sk = y.shape
    grad = torch.full_like(y, float("nan"))
    rc = lib.emu_softmax_backward(0 if y.dtype == torch.float16 else 1, grad.data_ptr(), dy.data_ptr(),
                                  y.data_ptr(), b * h * sq, h, sq, sk, scale, int(causal))
    return rc, grad


KERNEL_CASES = [  # (b, np, sq, sk, kind, mask shape)
    (1, 1, 3, 1, "padding", None),
    (2, 1, 7, 7, "causal", None),  # 14 rows: the last block is partly empty
    (1, 2, 5, 32, "padding", (1, 2, 5, 32)),
    (2, 2, 3, 34, "causal", None),  # 2 elements per lane, vector width 2
    (1, 3, 4, 100, "padding", (1, 1, 1, 100)),  # vector width 4
    (2, 1, 6, 136, "causal", (2, 1, 6, 136)),  # causal plus explicit mask
    (1, 2, 9, 4, "causal", None),  # sq > sk
    (1, 1, 5, 1000, "padding", (1, 1, 5, 1000)),
    (1, 1, 4, 2048, "causal", None),
    (1, 1, 3, 8192, "padding", (1, 1, 3, 1)),  # mask broadcast over keys is expanded here
    (1, 1, 3, MAX_KEY_LENGTH, "causal", None),  # the limit: 512 elements per lane
    (1, 1, 2, MAX_KEY_LENGTH, "padding", (1, 1, 2, MAX_KEY_LENGTH)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}")
def test_kernel_emulated_matches_reference(emu, dtype, case):
    b, h, sq, sk, kind, mask_shape = case
    g = torch.Generator().manual_seed(sk + sq)
    scores = (torch.randn(b, h, sq, sk, generator=g) * 3).to(dtype)
    mask = None
    if mask_shape is not None:
        mask = random_mask(mask_shape, seed=sk)
        mask.view(-1)[: mask_shape[-1]] = True  # a fully masked row
        if mask_shape[-1] == 1:
            mask = mask.expand(b, h, sq, sk).contiguous()
    scale = 0.37
    causal = kind == "causal"
    rc, probs = emu_forward(emu, scores, mask, scale, causal)
    assert rc == 0
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(probs.double(), reference(scores, mask, scale, causal), rtol=rtol, atol=atol)

    dy = torch.randn(b, h, sq, sk, generator=g).to(dtype)
    rc, grad = emu_backward(emu, dy, probs, scale, causal)
    assert rc == 0
    y, d = probs.double(), dy.double()
    expected = scale * y * (d - (d * y).sum(-1, keepdim=True))
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol + 1e-5 * expected.abs().max().item())


def test_kernel_emulated_rejects_what_the_header_forbids(emu):
    x = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    assert emu_forward(emu, x[..., :33].contiguous(), None, 1.0, False)[0] == 1  # odd sk with vector width 2
    assert emu_forward(emu, torch.zeros(1, 1, 1, MAX_KEY_LENGTH + 8, dtype=torch.float16), None, 1.0, False)[0] == 1
    flat = torch.zeros(2 * 256 + 1, dtype=torch.float16)
    misaligned = flat[1:].view(1, 1, 2, 256)  # 2-byte offset: 16-byte vectors would be misaligned
    assert emu_forward(emu, misaligned, None, 1.0, False)[0] == 1
    assert emu_forward(emu, x, None, 1.0, True)[0] == 0


def test_kernel_limits_agree_with_python(emu):
    assert ctypes.CDLL(emu._name).emu_max_key_length() == MAX_KEY_LENGTH
    for sk in range(1, MAX_KEY_LENGTH + 9):
        supported = emu.emu_key_length_supported(sk) == 1
        assert supported == (kernel_key_length_reason(sk) is None), sk
        if sk <= MAX_KEY_LENGTH:
            assert emu.emu_vector_width(sk) == kernel_vector_width(sk), sk


# ---------------------------------------------------------------- nvcc compile check
def _nvcc():
    found = shutil.which("nvcc")
    if found is None:
        candidates = sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))
        found = str(candidates[0]) if candidates else None
    return found


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: CUDA compile check skipped")
def test_check_compile_script_passes():
    run = subprocess.run(["bash", str(CSRC / "check_compile.sh")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "check_compile: OK" in run.stdout
    assert "120 kernels compiled" in run.stdout  # 3 templates x 10 key-length classes x 2 dtypes x 2 archs
