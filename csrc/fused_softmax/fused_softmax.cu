// PyTorch binding of the fused scale + mask + softmax kernels (fused_softmax.cuh). JIT-built on first use by
// megagpt/model/softmax.py through torch.utils.cpp_extension.load; never built on CPU-only machines.
//
//   forward(scores [b, np, sq, sk] fp16|bf16 CUDA, mask: bool tensor broadcastable to scores or None,
//           scale: float, causal: bool) -> probs (same shape and dtype)
//   backward(grad_probs, probs, scale, causal) -> grad_scores
// Inputs are made contiguous (and copied when misaligned) here; the shape limits are checked with a clear error.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fused_softmax.cuh"

namespace {

using megagpt_softmax::MaskStrides;
using megagpt_softmax::RowShape;

// Contiguous and 16-byte aligned (a view with an odd storage offset is copied).
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

RowShape check_scores(const at::Tensor& scores, const char* what) {
  TORCH_CHECK(scores.is_cuda(), what, " must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 4, what, " must be [b, np, sq, sk], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kHalf || scores.scalar_type() == at::kBFloat16, what,
              " must be float16 or bfloat16, got ", scores.scalar_type());
  const int64_t b = scores.size(0), np = scores.size(1), sq = scores.size(2), sk = scores.size(3);
  TORCH_CHECK(sk >= 1 && sk <= megagpt_softmax::kMaxKeyLength, "key length ", sk, " outside [1, ",
              megagpt_softmax::kMaxKeyLength, "]");
  TORCH_CHECK(megagpt_softmax::key_length_supported(static_cast<int>(sk)), "key length ", sk,
              " is not a multiple of the kernel's vector width ",
              megagpt_softmax::vector_width_for(static_cast<int>(sk)));
  TORCH_CHECK(np <= INT32_MAX && sq <= INT32_MAX, "heads and query length must fit int32");
  return RowShape{b * np * sq, static_cast<int>(std::max<int64_t>(np, 1)), static_cast<int>(std::max<int64_t>(sq, 1)),
                  static_cast<int>(sk)};
}

// Broadcast the mask to [b, np, sq, sk] without copying when its layout already suits the kernel.
at::Tensor prepare_mask(const at::Tensor& mask, const at::Tensor& scores, MaskStrides* strides) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "mask must be bool (True = masked out), got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == scores.device(), "mask is on ", mask.device(), ", scores on ", scores.device());
  at::Tensor m = mask.expand(scores.sizes());
  const int vec = megagpt_softmax::vector_width_for(static_cast<int>(scores.size(3)));
  auto stride_of = [&](int d) -> int64_t { return m.size(d) == 1 ? 0 : m.stride(d); };
  auto usable = [&](const at::Tensor& t) {
    const auto st = [&](int d) { return t.size(d) == 1 ? 0 : t.stride(d); };
    return (t.size(3) == 1 || t.stride(3) == 1) && st(0) % vec == 0 && st(1) % vec == 0 && st(2) % vec == 0 &&
           reinterpret_cast<uintptr_t>(t.data_ptr()) % vec == 0;
  };
  if (!usable(m)) m = m.contiguous();
  *strides = MaskStrides{stride_of(0), stride_of(1), stride_of(2)};
  return m;
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused softmax ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor softmax_forward(const at::Tensor& scores_in, const c10::optional<at::Tensor>& mask_in, double scale,
                           bool causal) {
  const RowShape shape = check_scores(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = dense_aligned(scores_in);
  at::Tensor out = at::empty_like(scores, at::MemoryFormat::Contiguous);
  if (shape.rows == 0) return out;
  MaskStrides strides{0, 0, 0};
  at::Tensor mask;  // keeps a broadcast/copied mask alive until the launch is queued
  const uint8_t* mask_ptr = nullptr;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = prepare_mask(*mask_in, scores, &strides);
    mask_ptr = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float s = static_cast<float>(scale);
  cudaError_t err;
  if (scores.scalar_type() == at::kHalf) {
    err = megagpt_softmax::launch_masked_softmax_forward<__half>(ptr<__half>(out), ptr<__half>(scores), mask_ptr,
                                                                 strides, shape, s, causal, stream);
  } else {
    err = megagpt_softmax::launch_masked_softmax_forward<__nv_bfloat16>(
        ptr<__nv_bfloat16>(out), ptr<__nv_bfloat16>(scores), mask_ptr, strides, shape, s, causal, stream);
  }
  check_launch(err, "forward");
  return out;
}

at::Tensor softmax_backward(const at::Tensor& grad_probs_in, const at::Tensor& probs_in, double scale, bool causal) {
  const RowShape shape = check_scores(probs_in, "probs");
  TORCH_CHECK(grad_probs_in.sizes() == probs_in.sizes(), "grad shape ", grad_probs_in.sizes(), " != probs shape ",
              probs_in.sizes());
  TORCH_CHECK(grad_probs_in.scalar_type() == probs_in.scalar_type(), "grad dtype ", grad_probs_in.scalar_type(),
              " != probs dtype ", probs_in.scalar_type());
  TORCH_CHECK(grad_probs_in.device() == probs_in.device(), "grad and probs on different devices");
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const at::Tensor probs = dense_aligned(probs_in);
  const at::Tensor grad_probs = dense_aligned(grad_probs_in);
  at::Tensor grad_scores = at::empty_like(probs, at::MemoryFormat::Contiguous);
  if (shape.rows == 0) return grad_scores;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float s = static_cast<float>(scale);
  cudaError_t err;
  if (probs.scalar_type() == at::kHalf) {
    err = megagpt_softmax::launch_softmax_backward<__half>(ptr<__half>(grad_scores), ptr<__half>(grad_probs),
                                                           ptr<__half>(probs), shape, s, causal, stream);
  } else {
    err = megagpt_softmax::launch_softmax_backward<__nv_bfloat16>(
        ptr<__nv_bfloat16>(grad_scores), ptr<__nv_bfloat16>(grad_probs), ptr<__nv_bfloat16>(probs), shape, s,
        causal, stream);
  }
  check_launch(err, "backward");
  return grad_scores;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megagpt fused scale + mask + softmax (fp16/bf16, sk <= 16384)";
  m.def("forward", &softmax_forward, "probs = softmax(scale * scores, masked); mask True = masked out",
        py::arg("scores"), py::arg("mask"), py::arg("scale"), py::arg("causal"));
  m.def("backward", &softmax_backward, "grad_scores = scale * probs * (grad - sum(grad * probs))",
        py::arg("grad_probs"), py::arg("probs"), py::arg("scale"), py::arg("causal"));
  m.attr("max_key_length") = megagpt_softmax::kMaxKeyLength;
}
