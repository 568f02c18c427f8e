// Compile check for the fused softmax templates without PyTorch (run by check_compile.sh, nothing executes):
// instantiating every launcher for fp16 and bf16 instantiates every kernel (3 kernel templates x 10 key-length
// classes x 2 dtypes = 60 kernels).
#include "fused_softmax.cuh"

namespace megagpt_softmax {

template cudaError_t launch_masked_softmax_forward<__half>(__half*, const __half*, const uint8_t*, MaskStrides,
                                                           RowShape, float, bool, cudaStream_t);
template cudaError_t launch_masked_softmax_forward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                                  const uint8_t*, MaskStrides, RowShape, float,
                                                                  bool, cudaStream_t);
template cudaError_t launch_causal_softmax_forward<__half>(__half*, const __half*, RowShape, float, cudaStream_t);
template cudaError_t launch_causal_softmax_forward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, RowShape,
                                                                  float, cudaStream_t);
template cudaError_t launch_softmax_backward<__half>(__half*, const __half*, const __half*, RowShape, float, bool,
                                                     cudaStream_t);
template cudaError_t launch_softmax_backward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                            const __nv_bfloat16*, RowShape, float, bool,
                                                            cudaStream_t);

// Compile-time checks of the documented limits.
static_assert(log2_elements_for(1) == 0 && log2_elements_for(32) == 0 && log2_elements_for(33) == 1, "E");
static_assert(log2_elements_for(16384) == kMaxLog2Elements, "E at the limit");
static_assert(vector_width_for(256) == 8 && vector_width_for(128) == 4 && vector_width_for(64) == 2, "V");
static_assert(key_length_supported(17) && !key_length_supported(33) && key_length_supported(34), "V rule");
static_assert(key_length_supported(16384) && !key_length_supported(16385) && !key_length_supported(0), "limit");
static_assert(!key_length_supported(1001) && key_length_supported(1000), "multiple of 8 above 128");

}  // namespace megagpt_softmax
