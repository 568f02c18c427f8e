// CPU warp emulator for the fused softmax kernels (tests only; never part of the product).
//
// Compiles fused_softmax.cuh with a plain C++ compiler (g++ -std=c++20 -shared -fPIC -pthread) and runs each
// kernel body on 32 std::threads that play the 32 lanes of a warp. Every shuffle is a two-phase exchange on a
// std::barrier, so the lanes run in lock-step exactly where the GPU code synchronises, and a divergent shuffle
// would deadlock instead of silently passing. Every vector load/store is checked for the alignment the GPU
// needs. This lets tests/test_softmax.py check the kernels' indexing, vector layout, masking, causal offsets,
// reductions and the backward formula on machines without a GPU, through the same kernel-selection code the
// CUDA launchers use. Not checked here: the CUDA intrinsics (__expf, conversions), timing, the torch binding.
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define MEGAGPT_SOFTMAX_HOST_EMULATION 1

namespace fs_emu {

struct WarpExchange {
  std::barrier<> barrier{32};
  float slot[32] = {};
};

thread_local int t_lane = 0;
thread_local int t_warp = 0;
thread_local int64_t t_block = 0;
thread_local WarpExchange* t_exchange = nullptr;
std::atomic<int> g_misaligned{0};

inline int lane_index() { return t_lane; }
inline int warp_in_block() { return t_warp; }
inline int64_t block_index() { return t_block; }

inline float shfl_xor(float v, int lane_mask) {
  WarpExchange& x = *t_exchange;
  x.slot[t_lane] = v;
  x.barrier.arrive_and_wait();  // every lane has published
  const float other = x.slot[t_lane ^ lane_mask];
  x.barrier.arrive_and_wait();  // every lane has read before the next shuffle overwrites
  return other;
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) g_misaligned.fetch_add(1);
}

inline float fp16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

inline uint16_t float_to_fp16(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace fs_emu

#include "fused_softmax.cuh"

namespace {

using namespace megagpt_softmax;

// Run `body` as a launch of ceil(rows / 4) blocks of 4 warps; the 32 lanes walk the warps in the same order.
template <typename Body>
int run_launch(int64_t rows, Body body) {
  fs_emu::g_misaligned.store(0);
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  fs_emu::WarpExchange exchange;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    lanes.emplace_back([&, lane] {
      fs_emu::t_lane = lane;
      fs_emu::t_exchange = &exchange;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int w = 0; w < kWarpsPerBlock; ++w) {
          fs_emu::t_block = b;
          fs_emu::t_warp = w;
          body();
        }
      }
    });
  }
  for (auto& t : lanes) t.join();
  return fs_emu::g_misaligned.load() == 0 ? 0 : 2;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16. Returns 0 on success, 1 when the launch arguments break a documented rule,
// 2 when a vector access was misaligned.
extern "C" int emu_softmax_forward(int dtype, void* out, const void* in, const uint8_t* mask, int64_t stride_b,
                                   int64_t stride_h, int64_t stride_q, int64_t rows, int heads, int sq, int sk,
                                   float scale, int causal) {
  const MaskStrides ms{stride_b, stride_h, stride_q};
  const RowShape shape{rows, heads, sq, sk};
  if (!forward_args_valid(out, in, mask, ms, shape)) return 1;
  const int log2 = log2_elements_for(sk);
  ForwardKernel kernel;
  if (dtype == 0)
    kernel = mask ? select_forward_kernel<Fp16Traits, true>(log2) : select_forward_kernel<Fp16Traits, false>(log2);
  else
    kernel = mask ? select_forward_kernel<Bf16Traits, true>(log2) : select_forward_kernel<Bf16Traits, false>(log2);
  return run_launch(rows, [&] {
    kernel(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(in), mask, ms, shape, scale, causal != 0);
  });
}

extern "C" int emu_softmax_backward(int dtype, void* grad_in, const void* grad_out, const void* probs, int64_t rows,
                                    int heads, int sq, int sk, float scale, int causal) {
  const RowShape shape{rows, heads, sq, sk};
  if (!backward_args_valid(grad_in, grad_out, probs, shape)) return 1;
  const int log2 = log2_elements_for(sk);
  const BackwardKernel kernel =
      dtype == 0 ? select_backward_kernel<Fp16Traits>(log2) : select_backward_kernel<Bf16Traits>(log2);
  return run_launch(rows, [&] {
    kernel(static_cast<uint16_t*>(grad_in), static_cast<const uint16_t*>(grad_out),
           static_cast<const uint16_t*>(probs), shape, scale, causal != 0);
  });
}

extern "C" int emu_max_key_length() { return kMaxKeyLength; }
extern "C" int emu_vector_width(int sk) { return vector_width_for(sk); }
extern "C" int emu_key_length_supported(int sk) { return key_length_supported(sk) ? 1 : 0; }
