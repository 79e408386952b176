// Host launch functions of the fastvit_C CUDA kernels: raw pointers, element strides (int64) and a
// cudaStream_t in, kernels launched, nothing allocated. ops_cuda.cpp (which sees torch) unpacks
// tensors, allocates outputs and workspaces, and checks cudaGetLastError() after each call; the
// *_kernels.cu files define these functions and include no torch/ATen/c10 header, so each compiles
// standalone (`nvcc -cubin -arch=sm_90 -O3 -std=c++17 -I csrc csrc/X_kernels.cu`) in seconds.
//
// Conventions: every pointer is a device pointer; "(rows, D)" tensors have a unit last stride and the
// row stride given beside them (in elements, 0 allowed where said); outputs are contiguous. Kernels
// assume valid input (fastvit.ops validates); launchers return without launching on empty sizes.
//
// The second half of the file (only under nvcc) holds device helpers shared by the .cu files: dtype
// conversion to and from float, aligned vector packs for 16-byte loads/stores, and row reductions.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastvit {
namespace cuda {

// The storage dtypes the kernels read and write; all math is float32.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Mixed-dtype pairs (input, output) that have kernels: equal dtypes, or one side float32. A float16 /
// bfloat16 pair has none: the caller upcasts the 16-bit input to float32 first (exact, same result).
inline bool dtype_pair_supported(DType a, DType b) {
  return a == b || a == DType::kFloat32 || b == DType::kFloat32;
}

// Bytes per element.
inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// ---- LayerNorm (layernorm_kernels.cu) -----------------------------------------------------------

// Widest rows the register-resident kernels hold (forward: 32 values per thread x 512 threads;
// backward: 16 x 512). Wider rows run looped kernels that re-read the row from global memory.
constexpr int64_t kLayerNormFwdRegisterMaxDim = 16384;
constexpr int64_t kLayerNormBwdRegisterMaxDim = 8192;

// y = (x - mean) * rstd * weight + bias per row; mean, rstd saved.
//   x:      (rows, dim) x_dtype, row stride x_row_stride
//   weight: (dim,) float32, 16-byte aligned, or null (1);  bias: same, or null (0)
//   y:      (rows, dim) y_dtype contiguous;  mean, rstd: (rows,) float32
// dtype_pair_supported(x_dtype, y_dtype) must hold.
void layer_norm_fwd(const void* x, int64_t x_row_stride, DType x_dtype, const float* weight, const float* bias,
                    int64_t rows, int64_t dim, float eps, void* y, DType y_dtype, float* mean, float* rstd,
                    cudaStream_t stream);

// Rows of the fp32 partial-gradient workspace that layer_norm_bwd fills for dweight/dbias: one per
// thread block of its dx kernel (a function of the shape, the dtypes and the device's SM count, so
// the fixed-order reduction gives the same bits on every run on the same device model).
int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t dim, DType x_dtype, DType grad_dtype, int sm_count);

// Residual-gradient dtypes layer_norm_bwd reads: x's or float32 (each is an unrolled copy of the dx store;
// more copies spill the scalar path). The caller upcasts any other to float32 (exact).
inline bool layer_norm_residual_supported(DType x_dtype, DType residual_dtype) {
  return residual_dtype == x_dtype || residual_dtype == DType::kFloat32;
}

// dx, dweight, dbias of layer_norm_fwd.
//   grad_y:   (rows, dim) grad_dtype, row stride grad_row_stride (0: an expanded gradient)
//   x:        (rows, dim) x_dtype, row stride x_row_stride
//   weight:   (dim,) float32, 16-byte aligned, or null (1)
//   mean, rstd: (rows,) float32 from the forward
//   dx:       (rows, dim) x_dtype contiguous, or null (not wanted)
//   residual_grad: (rows, dim) residual_dtype, row stride residual_row_stride (0 allowed), or null: added
//             to dx in fp32 before the rounding; layer_norm_residual_supported(x_dtype, residual_dtype) must hold
//   partials: (2, partial_rows, dim) float32 workspace (partial_rows from layer_norm_bwd_partial_rows),
//             null when neither dweight nor dbias is wanted
//   dweight, dbias: (dim,) param_dtype, each null when not wanted
// dtype_pair_supported(x_dtype, grad_dtype) must hold.
void layer_norm_bwd(const void* grad_y, int64_t grad_row_stride, DType grad_dtype, const void* x,
                    int64_t x_row_stride, DType x_dtype, const float* weight, const float* mean, const float* rstd,
                    int64_t rows, int64_t dim, void* dx, const void* residual_grad, int64_t residual_row_stride,
                    DType residual_dtype, float* partials, int64_t partial_rows, void* dweight, void* dbias,
                    DType param_dtype, int sm_count, cudaStream_t stream);

// ---- bias + GELU (bias_gelu_kernels.cu) ---------------------------------------------------------

// out = gelu(pre + bias), exact erf form or (tanh_form) the tanh approximation, fp32 math.
//   pre: (rows, hidden) dtype contiguous;  bias: (hidden,) bias_dtype contiguous, or null
//   out: (rows, hidden) dtype contiguous
void bias_gelu_fwd(const void* pre, const void* bias, DType bias_dtype, void* out, DType dtype, int64_t rows,
                   int64_t hidden, bool tanh_form, cudaStream_t stream);

// grad_pre = grad * gelu'(pre + bias); grad, pre, grad_pre (rows, hidden) contiguous in `dtype`;
// bias as in bias_gelu_fwd.
void bias_gelu_bwd(const void* grad, const void* pre, const void* bias, DType bias_dtype, void* grad_pre, DType dtype,
                   int64_t rows, int64_t hidden, bool tanh_form, cudaStream_t stream);

// ---- scaled residual (residual_kernels.cu) ------------------------------------------------------

// True where scaled_residual has a kernel for these dtypes (residual_dtype ignored without a
// residual); otherwise the caller upcasts branch and residual to float32 (exact) and asks again.
bool scaled_residual_supported(DType branch_dtype, DType residual_dtype, bool has_residual, DType out_dtype);

// out[r, j] = residual[r, j] + sample_scale[r / rows_per_sample] * layer_scale[j] * branch[r, j]
//   branch:   (rows, dim) branch_dtype, row stride branch_row_stride
//   residual: (rows, dim) residual_dtype, row stride residual_row_stride, or null (0)
//   layer_scale: (dim,) layer_scale_dtype contiguous, or null (1)
//   sample_scale: (rows / rows_per_sample,) sample_scale_dtype contiguous, or null (1)
//   out:      (rows, dim) out_dtype contiguous
void scaled_residual(const void* branch, int64_t branch_row_stride, DType branch_dtype, const void* residual,
                     int64_t residual_row_stride, DType residual_dtype, const void* layer_scale,
                     DType layer_scale_dtype, const void* sample_scale, DType sample_scale_dtype,
                     int64_t rows_per_sample, int64_t rows, int64_t dim, void* out, DType out_dtype,
                     cudaStream_t stream);

// ---- patchify (patchify_kernels.cu) -------------------------------------------------------------

// Image strides in elements, (b, c, y, x) order.
struct ImageStrides {
  int64_t batch, channel, height, width;
};

// (B, C, H, W) image, any strides -> (B * N, C * p * p) contiguous patch matrix in out_dtype.
void patchify(const void* image, DType image_dtype, ImageStrides strides, int64_t batch, int64_t channels,
              int64_t height, int64_t width, int64_t patch, void* cols, DType out_dtype, cudaStream_t stream);

// The inverse: (B * N, C * p * p) with row stride cols_row_stride -> (B, C, H, W) contiguous image in
// out_dtype.
void unpatchify(const void* cols, int64_t cols_row_stride, DType cols_dtype, int64_t batch, int64_t channels,
                int64_t height, int64_t width, int64_t patch, void* image, DType out_dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvit

// =================================================================================================
// Device helpers shared by the *_kernels.cu files (nvcc only).
// =================================================================================================
#if defined(__CUDACC__)

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastvit {
namespace cuda {
namespace detail {

// ---- dtype <-> float ----------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector packs -------------------------------------------------------------------------------

// N consecutive elements moved as one aligned unit: a 16-byte pack is one LDG.128/STG.128, a 32-byte
// pack (8 floats) two; alignment is capped at 16 bytes, the widest access the hardware has.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Elements per 16-byte access of T.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// Load N elements at p (aligned to the pack) as floats.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

// Store N floats at p (aligned to the pack), rounded to T.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// load_floats from a pointer whose dtype is known at run time only: for small vectors (a bias, a
// scale) loaded once per thread, where a switch costs nothing and saves kernel instantiations.
template <int N>
__device__ __forceinline__ void load_floats_as(const void* p, DType t, int64_t offset, float (&out)[N]) {
  switch (t) {
    case DType::kFloat16:
      load_floats<N>(static_cast<const __half*>(p) + offset, out);
      break;
    case DType::kBFloat16:
      load_floats<N>(static_cast<const __nv_bfloat16*>(p) + offset, out);
      break;
    case DType::kFloat32:
      load_floats<N>(static_cast<const float*>(p) + offset, out);
      break;
  }
}

// An optional per-column parameter (LayerNorm weight/bias, a GELU bias, layer_scale): N values at
// p + offset as floats, or `fill` (its identity: 1 for a scale, 0 for a bias) when p is null.
template <int N, typename T>
__device__ __forceinline__ void load_floats_or(const T* p, int64_t offset, float fill, float (&out)[N]) {
  if (p != nullptr) {
    load_floats<N>(p + offset, out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fill;
  }
}

// The same for a parameter whose dtype is only known at run time (see load_floats_as).
template <int N>
__device__ __forceinline__ void load_floats_as_or(const void* p, DType t, int64_t offset, float fill,
                                                  float (&out)[N]) {
  if (p != nullptr) {
    load_floats_as<N>(p, t, offset, out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fill;
  }
}

// True when p is aligned to `bytes` (a power of two).
__host__ __device__ inline bool is_aligned(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// ---- reductions ---------------------------------------------------------------------------------

// Butterfly sum over the 32 lanes: every lane ends with the same bits (fixed pairing order).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of N values over the blockDim.x threads that share threadIdx.y (one "row group": a warp or
// several), returned to every thread of the group. `scratch` holds 32 * N floats in shared memory.
// Every thread of the block must call it (it synchronises when a row group spans warps).
// The order is fixed: lanes by butterfly, then warps 0, 1, 2, ... of the group.
template <int N>
__device__ __forceinline__ void row_group_sum(float (&v)[N], float* scratch) {
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x > 32) {  // uniform over the block
    const int warps = static_cast<int>(blockDim.x >> 5);
    const int first = static_cast<int>(threadIdx.y) * warps;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) scratch[k * 32 + first + static_cast<int>(threadIdx.x >> 5)] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.0f;
      for (int w = 0; w < warps; ++w) s += scratch[k * 32 + first + w];
      v[k] = s;
    }
    __syncthreads();  // scratch is reused by the next call
  }
}

// Calls f(static_cast<T*>(nullptr)) with T the C++ type of `t` (__half, __nv_bfloat16, float), so a
// generic lambda `[&](auto* tag) { using T = std::remove_pointer_t<decltype(tag)>; ... }` is
// instantiated once per dtype.
template <typename F>
inline void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      f(static_cast<__half*>(nullptr));
      break;
    case DType::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    case DType::kFloat32:
      f(static_cast<float*>(nullptr));
      break;
  }
}

// True for the (A, B) type pairs of dtype_pair_supported: equal, or one of them float.
template <typename A, typename B>
constexpr bool kPairSupported = std::is_same<A, B>::value || std::is_same<A, float>::value ||
                                std::is_same<B, float>::value;

// Smallest power of two >= n (n >= 1), as int.
__host__ __device__ inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastvit

#endif  // __CUDACC__
