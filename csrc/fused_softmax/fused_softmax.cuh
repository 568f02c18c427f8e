// Fused scale + mask + softmax for attention scores, forward and backward, fp16/bf16 storage, fp32 math.
//
//   probs[r, j] = softmax_j(scale * scores[r, j], masked positions excluded)   (0 where masked)
//   grad_scores = scale * probs * (grad_probs - sum_j(grad_probs * probs))
//
// Two forward kernels share one template, softmax_forward_kernel<Traits, LOG2_ELEMS, HAS_MASK>:
//   (a) scaled upper-triangular (causal) softmax: HAS_MASK = false, causal = true. Only the keys a row may see
//       are read; the rest of the row is written as zeros without reading it.
//   (b) scaled softmax with an explicit boolean mask: HAS_MASK = true (causal may be set as well, in which case
//       both masks apply). HAS_MASK = false with causal = false is a plain scaled softmax.
// The backward kernel is shared by both (causal lets it skip the zero upper triangle).
// Limits and alignment rules: see the header comment of softmax_common.cuh; the launchers check them all.
//
// Layout inside a warp: lane l's chunk c holds columns [(c*32 + l) * V, (c*32 + l) * V + V), so each load
// instruction of the warp reads 32 consecutive V-element vectors (fully coalesced).
#pragma once

#include "softmax_common.cuh"

namespace megagpt_softmax {

// -inf stays -inf (masked) whatever the sign of scale.
FS_DEVICE float scaled_score(float x, float scale) { return x == -INFINITY ? -INFINITY : x * scale; }

template <typename Traits, int LOG2_ELEMS, bool HAS_MASK>
FS_GLOBAL void FS_LAUNCH_BOUNDS(kThreadsPerBlock)
softmax_forward_kernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ in,
                       const uint8_t* __restrict__ mask, MaskStrides mask_strides, RowShape shape,
                       float scale, bool causal) {
  constexpr int kElems = 1 << LOG2_ELEMS;
  constexpr int kVec = vector_width_for_log2(LOG2_ELEMS);
  constexpr int kChunks = kElems / kVec;

  const int64_t row = block_index() * kWarpsPerBlock + warp_in_block();
  if (row >= shape.rows) return;  // warp-uniform: the whole warp leaves together
  const int lane = lane_index();
  const int sk = shape.sk;
  const int valid = causal ? causal_valid_length(static_cast<int>(row % shape.sq), shape.sq, sk) : sk;
  const uint16_t* src = in + row * sk;
  const uint8_t* mask_row = nullptr;
  if constexpr (HAS_MASK) mask_row = mask + mask_row_offset(row, shape, mask_strides);

  // Load the row into fp32 registers; masked and out-of-range positions become -inf.
  float x[kElems];
  FS_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    const int col = (c * kWarpSize + lane) * kVec;
    if (col < valid) {  // col < valid <= sk and sk % kVec == 0: the whole vector is inside the row
      uint16_t e[kVec];
      unpack<kVec>(load_vec<kVec>(src + col), e);
      uint8_t m[kVec] = {};
      if constexpr (HAS_MASK) unpack<kVec>(load_vec<kVec>(mask_row + col), m);
      FS_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const bool keep = col + i < valid && m[i] == 0;
        x[c * kVec + i] = keep ? scaled_score(Traits::to_float(e[i]), scale) : -INFINITY;
      }
    } else {
      FS_UNROLL
      for (int i = 0; i < kVec; ++i) x[c * kVec + i] = -INFINITY;
    }
  }

  float row_max = -INFINITY;
  FS_UNROLL
  for (int i = 0; i < kElems; ++i) row_max = fmaxf(row_max, x[i]);
  row_max = warp_max(row_max);

  // Masked positions contribute exactly 0, also when the whole row is -inf (no -inf - -inf = NaN).
  float row_sum = 0.f;
  FS_UNROLL
  for (int i = 0; i < kElems; ++i) {
    x[i] = x[i] == -INFINITY ? 0.f : fast_exp(x[i] - row_max);
    row_sum += x[i];
  }
  row_sum = warp_sum(row_sum);
  // A fully masked row has sum 0 and yields zeros; a NaN sum stays NaN.
  const float inv_sum = row_sum == 0.f ? 0.f : 1.f / row_sum;

  uint16_t* dst = out + row * sk;
  FS_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    const int col = (c * kWarpSize + lane) * kVec;
    if (col < sk) {
      uint16_t e[kVec];
      FS_UNROLL
      for (int i = 0; i < kVec; ++i) e[i] = Traits::from_float(x[c * kVec + i] * inv_sum);
      store_vec<kVec>(dst + col, pack<kVec>(e));
    }
  }
}

template <typename Traits, int LOG2_ELEMS>
FS_GLOBAL void FS_LAUNCH_BOUNDS(kThreadsPerBlock)
softmax_backward_kernel(uint16_t* __restrict__ grad_in, const uint16_t* __restrict__ grad_out,
                        const uint16_t* __restrict__ probs, RowShape shape, float scale, bool causal) {
  constexpr int kElems = 1 << LOG2_ELEMS;
  constexpr int kVec = vector_width_for_log2(LOG2_ELEMS);
  constexpr int kChunks = kElems / kVec;
  using V = Vec<uint16_t, kVec>;

  const int64_t row = block_index() * kWarpsPerBlock + warp_in_block();
  if (row >= shape.rows) return;
  const int lane = lane_index();
  const int sk = shape.sk;
  // Under the causal mask probs are 0 from `valid` on, so those columns are not read (their grad is 0).
  const int valid = causal ? causal_valid_length(static_cast<int>(row % shape.sq), shape.sq, sk) : sk;
  const int64_t offset = row * sk;

  V dy[kChunks];
  V y[kChunks];
  FS_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    const int col = (c * kWarpSize + lane) * kVec;
    if (col < valid) {
      dy[c] = load_vec<kVec>(grad_out + offset + col);
      y[c] = load_vec<kVec>(probs + offset + col);
    } else {
      dy[c] = V{};  // all-zero bits are +0 in fp16 and bf16
      y[c] = V{};
    }
  }

  float dot = 0.f;  // sum_j dy_j * y_j
  FS_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    uint16_t a[kVec], b[kVec];
    unpack<kVec>(dy[c], a);
    unpack<kVec>(y[c], b);
    FS_UNROLL
    for (int i = 0; i < kVec; ++i) dot += Traits::to_float(a[i]) * Traits::to_float(b[i]);
  }
  dot = warp_sum(dot);

  FS_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    const int col = (c * kWarpSize + lane) * kVec;
    if (col < sk) {
      uint16_t a[kVec], b[kVec];
      unpack<kVec>(dy[c], a);
      unpack<kVec>(y[c], b);
      FS_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const float yi = Traits::to_float(b[i]);
        a[i] = Traits::from_float(scale * yi * (Traits::to_float(a[i]) - dot));
      }
      store_vec<kVec>(grad_in + offset + col, pack<kVec>(a));
    }
  }
}

// ---- kernel selection by key length (shared by the CUDA launchers and the host emulator) -------------------
using ForwardKernel = void (*)(uint16_t*, const uint16_t*, const uint8_t*, MaskStrides, RowShape, float, bool);
using BackwardKernel = void (*)(uint16_t*, const uint16_t*, const uint16_t*, RowShape, float, bool);

template <typename Traits, bool HAS_MASK, int LOG2 = 0>
ForwardKernel select_forward_kernel(int log2) {
  if (log2 == LOG2) return &softmax_forward_kernel<Traits, LOG2, HAS_MASK>;
  if constexpr (LOG2 < kMaxLog2Elements) {
    return select_forward_kernel<Traits, HAS_MASK, LOG2 + 1>(log2);
  } else {
    return nullptr;
  }
}

template <typename Traits, int LOG2 = 0>
BackwardKernel select_backward_kernel(int log2) {
  if (log2 == LOG2) return &softmax_backward_kernel<Traits, LOG2>;
  if constexpr (LOG2 < kMaxLog2Elements) {
    return select_backward_kernel<Traits, LOG2 + 1>(log2);
  } else {
    return nullptr;
  }
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Host-side validation of every rule in softmax_common.cuh; `mask` may be null. Returns true when usable.
inline bool forward_args_valid(const void* out, const void* in, const uint8_t* mask, const MaskStrides& ms,
                               const RowShape& shape) {
  if (shape.rows < 0 || shape.heads < 1 || shape.sq < 1 || !key_length_supported(shape.sk)) return false;
  if (shape.rows % (static_cast<int64_t>(shape.heads) * shape.sq) != 0) return false;
  if ((shape.rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 2147483647LL) return false;
  const int vec = vector_width_for(shape.sk);
  if (!aligned_to(out, 2 * vec) || !aligned_to(in, 2 * vec)) return false;
  if (mask != nullptr && (!aligned_to(mask, vec) || ms.batch % vec != 0 || ms.head % vec != 0 ||
                          ms.query % vec != 0))
    return false;
  return true;
}

inline bool backward_args_valid(const void* grad_in, const void* grad_out, const void* probs,
                                const RowShape& shape) {
  return forward_args_valid(grad_in, grad_out, nullptr, MaskStrides{0, 0, 0}, shape) &&
         aligned_to(probs, 2 * vector_width_for(shape.sk));
}

#if !defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
template <typename T> struct TraitsFor;
template <> struct TraitsFor<__half> { using type = Fp16Traits; };
template <> struct TraitsFor<__nv_bfloat16> { using type = Bf16Traits; };

inline unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// (b) explicit mask (nullable: no mask), optionally also causal. T is __half or __nv_bfloat16.
template <typename T>
cudaError_t launch_masked_softmax_forward(T* out, const T* scores, const uint8_t* mask, MaskStrides mask_strides,
                                          RowShape shape, float scale, bool causal, cudaStream_t stream) {
  using Traits = typename TraitsFor<T>::type;
  if (!forward_args_valid(out, scores, mask, mask_strides, shape)) return cudaErrorInvalidValue;
  if (shape.rows == 0) return cudaSuccess;
  const int log2 = log2_elements_for(shape.sk);
  const ForwardKernel kernel = mask != nullptr ? select_forward_kernel<Traits, true>(log2)
                                               : select_forward_kernel<Traits, false>(log2);
  kernel<<<blocks_for(shape.rows), kThreadsPerBlock, 0, stream>>>(
      reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(scores), mask, mask_strides, shape,
      scale, causal);
  return cudaGetLastError();
}

// (a) upper-triangular (causal) mask, no mask tensor.
template <typename T>
cudaError_t launch_causal_softmax_forward(T* out, const T* scores, RowShape shape, float scale,
                                          cudaStream_t stream) {
  return launch_masked_softmax_forward<T>(out, scores, nullptr, MaskStrides{0, 0, 0}, shape, scale, true, stream);
}

// grad_in must not alias grad_out or probs (the kernel's pointers are __restrict__).
template <typename T>
cudaError_t launch_softmax_backward(T* grad_in, const T* grad_out, const T* probs, RowShape shape, float scale,
                                    bool causal, cudaStream_t stream) {
  using Traits = typename TraitsFor<T>::type;
  if (!backward_args_valid(grad_in, grad_out, probs, shape)) return cudaErrorInvalidValue;
  if (shape.rows == 0) return cudaSuccess;
  const BackwardKernel kernel = select_backward_kernel<Traits>(log2_elements_for(shape.sk));
  kernel<<<blocks_for(shape.rows), kThreadsPerBlock, 0, stream>>>(
      reinterpret_cast<uint16_t*>(grad_in), reinterpret_cast<const uint16_t*>(grad_out),
      reinterpret_cast<const uint16_t*>(probs), shape, scale, causal);
  return cudaGetLastError();
}
#endif  // !MEGAGPT_SOFTMAX_HOST_EMULATION

}  // namespace megagpt_softmax
