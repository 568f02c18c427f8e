// Shared pieces of the fused scale + mask + softmax kernels: limits, 16-bit storage traits, vector IO and
// warp reductions. No PyTorch here; fused_softmax.cuh holds the kernels, fused_softmax.cu the torch binding.
//
// Exact limits and alignment rules (the launchers in fused_softmax.cuh check every one of them and return
// cudaErrorInvalidValue otherwise; megagpt/model/softmax.py checks the same rules before choosing the kernel):
//   * Data: scores / probs / grads are contiguous row-major [rows, sk] arrays of fp16 or bf16, rows = b*np*sq.
//     All arithmetic is fp32 in registers; only loads and stores are 16-bit.
//   * Key length: 1 <= sk <= 16384 (kMaxKeyLength). One warp owns one row; each lane holds
//     E = max(1, next_pow2(sk) / 32) elements (a template parameter, 1..512).
//   * Vector width: a lane moves V = min(8, E) consecutive elements per load/store (16 bytes when E >= 8), so
//     sk must be a multiple of V: any sk <= 32, even sk in 33..64, a multiple of 4 in 65..128 and a multiple
//     of 8 in 129..16384. The base pointers of scores/probs/grads must be aligned to 2*V bytes (16 always
//     suffices; every CUDA caching-allocator block is 512-byte aligned).
//   * Mask (explicit-mask kernel only): bytes, 0 = keep, nonzero = masked out. Row (b, h, q) starts at
//     mask + b*stride_b + h*stride_h + q*stride_q and its sk bytes are contiguous (stride 0 broadcasts a dim);
//     the three strides must be multiples of V and the mask pointer aligned to V bytes.
//   * Grid: one block of 4 warps per 4 rows, so rows <= 4 * (2^31 - 1); sq, np and sk fit int32; all element
//     offsets are int64 (b*np*sq*sk may exceed 2^31).
//   * Causal: row q of a [sq, sk] block keeps keys j <= q + (sk - sq); any sq >= 1 is allowed (sq > sk makes
//     the first sq - sk rows fully masked).
//   * Fully masked rows (and positions whose input is -inf) give probability 0, never NaN. NaN inputs give
//     NaN for the unmasked positions of their row, as torch.softmax does.
// Register use: about one fp32 register per element per tensor (E in the forward, 2E in the backward), so the
// forward stays in registers up to sk = 4096 and the backward up to sk = 2048; longer rows spill to local
// memory (still correct, slower). check_compile.sh prints ptxas' register and spill counts per kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
// host_emulation.cpp defines namespace fs_emu (lane ids, shuffles, conversions) before including this file.
#define FS_HD
#define FS_DEVICE inline
#define FS_GLOBAL
#define FS_LAUNCH_BOUNDS(n)
#define FS_UNROLL
#define FS_CHECK_ALIGNED(ptr, bytes) fs_emu::check_aligned((ptr), (bytes))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FS_HD __host__ __device__
#define FS_DEVICE __device__ __forceinline__
#define FS_GLOBAL __global__
#define FS_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define FS_UNROLL _Pragma("unroll")
#define FS_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace megagpt_softmax {

constexpr int kWarpSize = 32;
constexpr int kMaxKeyLength = 16384;
constexpr int kMaxLog2Elements = 9;  // 512 elements per lane * 32 lanes = kMaxKeyLength
constexpr int kMaxVectorElements = 8;  // 8 x 16 bit = one 16-byte load
constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpsPerBlock * kWarpSize;
static_assert((kWarpSize << kMaxLog2Elements) == kMaxKeyLength, "limits disagree");

// log2 of the elements each lane holds for key length sk: the smallest L with 32 * 2^L >= sk.
FS_HD constexpr int log2_elements_for(int sk) {
  int log2 = 0;
  while ((kWarpSize << log2) < sk) ++log2;
  return log2;
}

FS_HD constexpr int vector_width_for_log2(int log2) {
  return (1 << log2) < kMaxVectorElements ? (1 << log2) : kMaxVectorElements;
}

FS_HD constexpr int vector_width_for(int sk) { return vector_width_for_log2(log2_elements_for(sk)); }

FS_HD constexpr bool key_length_supported(int sk) {
  return sk >= 1 && sk <= kMaxKeyLength && sk % vector_width_for(sk) == 0;
}

// rows = batch * heads * sq; row r is (b, h, q) with q fastest.
struct RowShape {
  int64_t rows;
  int heads;
  int sq;
  int sk;
};

// Element strides of the mask's batch, head and query dims (0 = broadcast); keys are contiguous.
struct MaskStrides {
  int64_t batch;
  int64_t head;
  int64_t query;
};

// ---- 16-bit storage: the kernels move raw bits and convert to fp32 only in registers ----------------------
struct Fp16Traits {
#if defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
  static inline float to_float(uint16_t bits) { return fs_emu::fp16_to_float(bits); }
  static inline uint16_t from_float(float x) { return fs_emu::float_to_fp16(x); }
#else
  static FS_DEVICE float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static FS_DEVICE uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
#endif
};

struct Bf16Traits {
#if defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
  static inline float to_float(uint16_t bits) { return fs_emu::bf16_to_float(bits); }
  static inline uint16_t from_float(float x) { return fs_emu::float_to_bf16(x); }
#else
  static FS_DEVICE float to_float(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
  static FS_DEVICE uint16_t from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
#endif
};

// ---- vector IO: one load/store instruction of N elements ---------------------------------------------------
#if defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
struct alignas(8) Bits64 { uint32_t x, y; };
struct alignas(16) Bits128 { uint32_t x, y, z, w; };
#else
using Bits64 = uint2;
using Bits128 = uint4;
#endif

template <int BYTES> struct VecBits;
template <> struct VecBits<1> { using type = uint8_t; };
template <> struct VecBits<2> { using type = uint16_t; };
template <> struct VecBits<4> { using type = uint32_t; };
template <> struct VecBits<8> { using type = Bits64; };
template <> struct VecBits<16> { using type = Bits128; };

template <typename E, int N>
using Vec = typename VecBits<N * static_cast<int>(sizeof(E))>::type;

template <int N, typename E>
FS_DEVICE Vec<E, N> load_vec(const E* src) {
  FS_CHECK_ALIGNED(src, sizeof(Vec<E, N>));
  return *reinterpret_cast<const Vec<E, N>*>(src);
}

template <int N, typename E>
FS_DEVICE void store_vec(E* dst, const Vec<E, N>& v) {
  FS_CHECK_ALIGNED(dst, sizeof(Vec<E, N>));
  *reinterpret_cast<Vec<E, N>*>(dst) = v;
}

// Reinterpret a register vector as its N elements and back (compiles to register moves).
template <int N, typename E>
FS_DEVICE void unpack(const Vec<E, N>& v, E (&out)[N]) { memcpy(out, &v, sizeof(v)); }

template <int N, typename E>
FS_DEVICE Vec<E, N> pack(const E (&in)[N]) {
  Vec<E, N> v;
  memcpy(&v, in, sizeof(v));
  return v;
}

// ---- thread indexing, shuffles and exp ---------------------------------------------------------------------
#if defined(MEGAGPT_SOFTMAX_HOST_EMULATION)
inline int lane_index() { return fs_emu::lane_index(); }
inline int warp_in_block() { return fs_emu::warp_in_block(); }
inline int64_t block_index() { return fs_emu::block_index(); }
inline float shfl_xor(float v, int lane_mask) { return fs_emu::shfl_xor(v, lane_mask); }
inline float fast_exp(float x) { return std::exp(x); }
#else
FS_DEVICE int lane_index() { return static_cast<int>(threadIdx.x) % kWarpSize; }
FS_DEVICE int warp_in_block() { return static_cast<int>(threadIdx.x) / kWarpSize; }
FS_DEVICE int64_t block_index() { return static_cast<int64_t>(blockIdx.x); }
FS_DEVICE float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
// ex2.approx based: relative error a few fp32 ulps for the arguments here (x - max <= 0).
FS_DEVICE float fast_exp(float x) { return __expf(x); }
#endif

// Butterfly reductions: every lane ends with the warp-wide result. Must be reached by all 32 lanes.
FS_DEVICE float warp_max(float v) {
  FS_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, shfl_xor(v, offset));
  return v;
}

FS_DEVICE float warp_sum(float v) {
  FS_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += shfl_xor(v, offset);
  return v;
}

// Number of leading keys row q may attend to under the causal rule j <= q + (sk - sq), clamped to [0, sk].
FS_DEVICE int causal_valid_length(int q, int sq, int sk) {
  const int64_t keep = static_cast<int64_t>(q) + sk - sq + 1;
  return keep < 0 ? 0 : (keep > sk ? sk : static_cast<int>(keep));
}

// Element offset of row `row`'s mask row.
FS_DEVICE int64_t mask_row_offset(int64_t row, const RowShape& shape, const MaskStrides& strides) {
  const int64_t q = row % shape.sq;
  const int64_t bh = row / shape.sq;
  return (bh / shape.heads) * strides.batch + (bh % shape.heads) * strides.head + q * strides.query;
}

}  // namespace megagpt_softmax
