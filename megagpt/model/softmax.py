"""FusedScaleMaskSoftmax: attention probabilities from raw scores, fused CUDA kernel when usable, PyTorch otherwise.

Why a kernel: in eager PyTorch, scale -> mask fill -> fp32 cast -> softmax -> cast back reads and writes the
[b, np, sq, sk] score tensor several times; csrc/fused_softmax does it in one read and one write (the causal kernel
does not even read the masked upper triangle), with fp32 math in registers. Both paths compute the same function:

    probs = softmax(scale * scores) over keys, masked positions excluded and set to 0; fully masked rows are all 0.

(One corner differs: the kernel also treats scores that are already -inf as masked, so an unmasked row of all -inf
gives zeros there and NaN on the PyTorch path.)

The kernel is used when all of these hold (else `fused_unavailable_reason` names the first that fails, checked in
this order): fusion not disabled, dtype fp16/bf16, 4-D scores, key length within the kernel's limits (<= 16384 and a
multiple of its vector width, see csrc/fused_softmax/softmax_common.cuh), input on CUDA, extension built. The
extension is JIT-compiled on first use (torch.utils.cpp_extension.load, cached under TORCH_EXTENSIONS_DIR, keyed by
a hash of the sources); nothing CUDA is imported, built or called while inputs are on the CPU.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor, nn

MAX_KEY_LENGTH = 16384  # kMaxKeyLength in csrc/fused_softmax/softmax_common.cuh
_WARP_SIZE = 32
_MAX_VECTOR = 8  # 16-byte loads of 16-bit values
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc" / "fused_softmax"
_BINDING = "fused_softmax.cu"
_HEADERS = ("fused_softmax.cuh", "softmax_common.cuh")


def kernel_vector_width(sk: int) -> int:
    """Elements per vector load for key length sk: min(8, max(1, next_pow2(sk) / 32)), as in the kernel."""
    elems = 1
    while _WARP_SIZE * elems < sk:
        elems *= 2
    return min(_MAX_VECTOR, elems)


def kernel_key_length_reason(sk: int) -> Optional[str]:
    """Why the kernel cannot take rows of `sk` keys, or None when it can."""
    if sk > MAX_KEY_LENGTH:
        return f"key length {sk} > {MAX_KEY_LENGTH}"
    if sk < 1:
        return f"key length {sk} < 1"
    vec = kernel_vector_width(sk)
    if sk % vec:
        return f"key length {sk} is not a multiple of {vec} (the kernel's vector width)"
    return None


class _LazyExtension:
    """Builds and imports the CUDA extension once, on first demand, and remembers why it failed if it did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._module: Optional[ModuleType] = None
        self._reason: Optional[str] = None

    def get(self) -> tuple[Optional[ModuleType], Optional[str]]:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._module = self._build()
                except Exception as exc:  # a failed build must never break training: fall back, say why
                    lines = str(exc).strip().splitlines()
                    self._reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip()
            return self._module, self._reason

    @staticmethod
    def _build() -> ModuleType:
        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
        sources = [_CSRC_DIR / _BINDING, *(_CSRC_DIR / h for h in _HEADERS)]
        missing = [str(p) for p in sources if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"kernel sources missing: {', '.join(missing)}")
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
        from torch.utils import cpp_extension  # imported only when a CUDA input asks for the kernel

        # The name carries a hash of the sources (headers included), so an edit rebuilds; the build directory is
        # torch's default, $TORCH_EXTENSIONS_DIR/<name> when that is set; concurrent ranks wait on its lock file.
        return cpp_extension.load(
            name=f"megagpt_fused_softmax_{digest}",
            sources=[str(_CSRC_DIR / _BINDING)],
            extra_include_paths=[str(_CSRC_DIR)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            verbose=False,
        )


_EXTENSION = _LazyExtension()


def is_available() -> bool:
    """True when the CUDA extension is (or could now be) built and imported. Builds it on the first call."""
    return _EXTENSION.get()[0] is not None


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be used (after trying to build it), or None."""
    module, reason = _EXTENSION.get()
    return None if module is not None else reason


def kernel_problem(fusion: bool, dtype: torch.dtype, key_length: int, device_type: str) -> Optional[str]:
    """Why scores of `dtype` with `key_length` keys on `device_type` cannot go through the kernel (None: they can),
    checked in the module docstring's order. On CUDA this builds the extension (once)."""
    if not fusion:
        return "disabled by --no-masked-softmax-fusion"
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} not fp16/bf16"
    reason = kernel_key_length_reason(key_length)
    if reason is not None:
        return reason
    if device_type != "cuda":
        return f"input is on {device_type}"
    module, build_error = _EXTENSION.get()
    return None if module is not None else f"extension not built: {build_error}"


class _FusedSoftmaxFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward both run the CUDA kernels; only probs are saved."""

    @staticmethod
    def forward(ctx, scores: Tensor, mask: Optional[Tensor], scale: float, causal: bool,  # type: ignore[override]
                ext: ModuleType) -> Tensor:
        probs = ext.forward(scores, mask, scale, causal)  # [b, np, sq, sk]
        ctx.save_for_backward(probs)
        ctx.scale, ctx.causal, ctx.ext = scale, causal, ext
        return probs

    @staticmethod
    def backward(ctx, grad_probs: Tensor):  # type: ignore[override]
        (probs,) = ctx.saved_tensors
        grad_scores = ctx.ext.backward(grad_probs, probs, ctx.scale, ctx.causal)  # [b, np, sq, sk]
        return grad_scores, None, None, None, None


class FusedScaleMaskSoftmax(nn.Module):
    """probs = softmax(scale * scores) with a causal and/or boolean mask (True = masked out).

    attn_mask_type: "causal" masks keys j > i + (sk - sq) for query row i (built internally; an explicit mask, if
    given, is applied as well) - any sq, with rows that see no key giving zeros; "padding" applies only `mask`
    (None = no mask). scale: multiplies the scores first (None = 1). softmax_in_fp32: the PyTorch path upcasts
    fp16/bf16 scores to fp32 (the kernel always computes in fp32). masked_softmax_fusion=False
    (--no-masked-softmax-fusion) forces the PyTorch path. Output dtype = input dtype.
    """

    def __init__(self, attn_mask_type: str, scale: Optional[float], softmax_in_fp32: bool = True,
                 masked_softmax_fusion: bool = True) -> None:
        super().__init__()
        if attn_mask_type not in ("causal", "padding"):
            raise ValueError(f"attn_mask_type must be 'causal' or 'padding', got {attn_mask_type!r}")
        self.attn_mask_type = attn_mask_type
        self.scale = None if scale is None else float(scale)
        self.softmax_in_fp32 = softmax_in_fp32
        self.masked_softmax_fusion = masked_softmax_fusion

    def extra_repr(self) -> str:
        return (f"attn_mask_type={self.attn_mask_type}, scale={self.scale}, softmax_in_fp32={self.softmax_in_fp32}, "
                f"masked_softmax_fusion={self.masked_softmax_fusion}")

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """scores [b, np, sq, sk] -> probs [b, np, sq, sk] in scores' dtype; mask: bool, broadcastable to scores."""
        self._check_mask(scores, mask)
        if self.fused_unavailable_reason(scores, mask) is None:
            ext, _ = _EXTENSION.get()
            scale = 1.0 if self.scale is None else self.scale
            return _FusedSoftmaxFunction.apply(scores, mask, scale, self.attn_mask_type == "causal", ext)
        return self._torch_softmax(scores, mask)

    def fused_unavailable_reason(self, scores: Tensor, mask: Optional[Tensor] = None) -> Optional[str]:
        """Why forward would take the PyTorch path for these inputs, or None when it uses the kernel."""
        if self.masked_softmax_fusion and scores.dtype in _KERNEL_DTYPES and scores.dim() != 4:
            return f"scores are {scores.dim()}-D, the kernel takes [b, np, sq, sk]"
        return kernel_problem(self.masked_softmax_fusion, scores.dtype, scores.shape[-1], scores.device.type)

    @staticmethod
    def _check_mask(scores: Tensor, mask: Optional[Tensor]) -> None:
        if mask is None:
            return
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = masked out), got {mask.dtype}")
        if mask.device != scores.device:
            raise ValueError(f"mask is on {mask.device}, scores on {scores.device}")
        try:
            broadcast = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != scores.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}")

    def _torch_softmax(self, scores: Tensor, mask: Optional[Tensor]) -> Tensor:
        masked = mask
        may_have_empty_rows = mask is not None
        if self.attn_mask_type == "causal":
            sq, sk = scores.shape[-2], scores.shape[-1]
            # True above the shifted diagonal: key j > i + (sk - sq) is in query i's future.
            causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu_(sk - sq + 1)  # [sq, sk]
            masked = causal if mask is None else mask | causal
            may_have_empty_rows = may_have_empty_rows or sq > sk  # rows i < sq - sk see no key
        x = scores
        if self.softmax_in_fp32 and x.dtype in _KERNEL_DTYPES:
            x = x.float()
        if masked is not None and not may_have_empty_rows:
            # causal: scale and mask in one pass, bias + scale * x (one multiply in backward, no masked copy)
            bias = torch.zeros(masked.shape, dtype=x.dtype, device=x.device).masked_fill_(masked, float("-inf"))
            x = torch.add(bias, x, alpha=1.0 if self.scale is None else self.scale)
        else:
            if self.scale is not None:
                x = x * self.scale
            if masked is not None:  # masked_fill's backward zeroes the NaN grads of rows with no visible key
                x = x.masked_fill(masked, float("-inf"))
        probs = torch.softmax(x, dim=-1)  # [b, np, sq, sk]
        if may_have_empty_rows:
            probs = probs.masked_fill(masked, 0.0)  # fully masked rows are NaN after softmax: make them 0
        return probs.to(scores.dtype)


def attention_backend_line(requested: str, core: str, device_type: str, dtype: torch.dtype, seq_length: int,
                           fusion: bool = True) -> str:
    """The start-up line naming the attention core that runs and why. ValueError when `--attention-backend fused`
    asks for the kernel on a CUDA run that cannot use it: a silent fallback would cost the run its speed unseen.
    (On the CPU, fused computes the kernel's function with PyTorch ops: there is no kernel to miss.)"""
    if core == "flash":
        where = "flash / memory-efficient kernels" if device_type == "cuda" else "its CPU kernel"
        return f"attention: flash (torch scaled_dot_product_attention, {where}; --attention-backend {requested})"
    if core == "unfused":
        return "attention: unfused (matmul, PyTorch softmax, matmul; --attention-backend unfused)"
    problem = kernel_problem(fusion, dtype, seq_length, device_type)   # on CUDA: builds it now, not at step 1
    if problem is None:
        return f"attention: fused softmax CUDA kernel (csrc/fused_softmax; --attention-backend {requested})"
    if requested == "fused" and device_type == "cuda":
        raise ValueError(f"--attention-backend fused cannot use the fused softmax kernel: {problem}. Use "
                         f"--attention-backend flash (or local, which falls back to PyTorch's softmax)")
    return f"attention: {requested}, PyTorch softmax (the kernel cannot run: {problem}; --attention-backend {requested})"
