// Bias + GELU forward (out = gelu(pre + bias)) and backward (grad_pre = grad * gelu'(pre + bias)) on a
// contiguous (rows, hidden) matrix: the epilogue of FC1 that cuBLASLt cannot fuse exactly (its GELU
// epilogue is the tanh form). Exact erf GELU or the tanh approximation, a compile-time choice; math
// in fp32 through row_math.h's gelu_value / gelu_grad, so the CPU loops test the same formulas.
//
// Layout: 2-D over (column vector, row) so the bias vector is loaded once per thread and kept in
// registers for all the rows it visits, and no 64-bit division is needed per element. A thread owns
// VEC consecutive columns (16 bytes: 8 fp16/bf16 or 4 fp32 when hidden % VEC == 0 and the pointers
// are 16-byte aligned; else VEC = 1) and walks rows with a grid stride, kUnrollRows rows per step with
// the loads of all those rows issued before the math (memory-level parallelism). Offsets are int64.
// The bias may be fp16, bf16 or fp32 whatever pre's dtype (it is loaded once per thread, through a
// run-time dtype switch) and is added in fp32, as the CPU loops do.

#include <algorithm>
#include <cstdint>

#include "launchers.h"
#include "row_math.h"

namespace fastvit {
namespace cuda {
namespace {

using detail::dispatch_dtype;
using detail::load_floats;
using detail::store_floats;

constexpr int kBlockThreads = 256;
// Rows per thread per step: 4, or 2 for 8-element vectors (8 x 2 x 2 values of loads in flight
// already, and erf's registers: 4 x 8 spends 128 registers per thread).
template <int VEC>
constexpr int kUnrollRows = VEC >= 8 ? 2 : 4;
constexpr int64_t kMaxGridY = 65535;

// Launch: block (bx, by) with bx * by = kBlockThreads, bx = min(256, hidden_vectors rounded up to
// 32); grid (ceil(hidden_vectors / bx), min(ceil(rows / (by * kUnrollRows)), 65535)).
//   pre:  (rows, hidden) T contiguous;  bias: (hidden,) bias_dtype (any of the three), or null
//   grad: (rows, hidden) T contiguous (backward only; null in the forward)
//   out:  (rows, hidden) T contiguous: gelu(pre + bias), or grad * gelu'(pre + bias) when kBackward
template <typename T, int VEC, bool kTanh, bool kBackward>
__global__ void __launch_bounds__(kBlockThreads, 2)
    bias_gelu_kernel(const T* __restrict__ pre, const void* __restrict__ bias, DType bias_dtype,
                     const T* __restrict__ grad, T* __restrict__ out, int64_t rows, int64_t hidden) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= hidden) return;  // no block-level synchronisation below
  float b[VEC];
  detail::load_floats_as_or<VEC>(bias, bias_dtype, col, 0.0f, b);
  constexpr int kUnroll = kUnrollRows<VEC>;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row0 < rows;
       row0 += row_step * kUnroll) {
    float p[kUnroll][VEC];
    float g[kUnroll][VEC];
    // 1. issue the loads of up to kUnroll rows
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = row0 + u * row_step;
      if (row < rows) {
        load_floats<VEC>(pre + row * hidden + col, p[u]);
        if constexpr (kBackward) load_floats<VEC>(grad + row * hidden + col, g[u]);
      }
    }
    // 2. GELU (or its derivative times grad) in fp32, store
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = row0 + u * row_step;
      if (row < rows) {
        float o[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float v = p[u][k] + b[k];
          if constexpr (kBackward) {
            o[k] = g[u][k] * gelu_grad(v, kTanh);
          } else {
            o[k] = gelu_value(v, kTanh);
          }
        }
        store_floats<VEC>(out + row * hidden + col, o);
      }
    }
  }
}

// One instantiation per GELU form, chosen at run time.
template <typename T, int VEC, bool kBackward>
void launch_form(dim3 grid, dim3 block, bool tanh_form, const T* pre, const void* bias, DType bias_dtype,
                 const T* grad, T* out, int64_t rows, int64_t hidden, cudaStream_t stream) {
  if (tanh_form) {
    bias_gelu_kernel<T, VEC, true, kBackward>
        <<<grid, block, 0, stream>>>(pre, bias, bias_dtype, grad, out, rows, hidden);
  } else {
    bias_gelu_kernel<T, VEC, false, kBackward>
        <<<grid, block, 0, stream>>>(pre, bias, bias_dtype, grad, out, rows, hidden);
  }
}

template <typename T, bool kBackward>
void launch(const T* pre, const void* bias, DType bias_dtype, const T* grad, T* out, int64_t rows, int64_t hidden,
            bool tanh_form, cudaStream_t stream) {
  constexpr int V = detail::vec16<T>();
  const int64_t bias_align = std::min<int64_t>(16, V * dtype_size(bias_dtype));
  const bool vector = hidden % V == 0 && detail::is_aligned(pre, 16) && detail::is_aligned(out, 16) &&
                      (bias == nullptr || detail::is_aligned(bias, bias_align)) &&
                      (grad == nullptr || detail::is_aligned(grad, 16));
  const int64_t vectors = vector ? hidden / V : hidden;
  const int bx = static_cast<int>(std::min<int64_t>(kBlockThreads, (vectors + 31) / 32 * 32));
  const int by = kBlockThreads / bx;
  const dim3 block(bx, by);
  const int64_t rows_per_block = static_cast<int64_t>(by) * (vector ? kUnrollRows<V> : kUnrollRows<1>);
  const dim3 grid(static_cast<unsigned>((vectors + bx - 1) / bx),
                  static_cast<unsigned>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, kMaxGridY)));
  if (vector) {
    launch_form<T, V, kBackward>(grid, block, tanh_form, pre, bias, bias_dtype, grad, out, rows, hidden, stream);
  } else {
    launch_form<T, 1, kBackward>(grid, block, tanh_form, pre, bias, bias_dtype, grad, out, rows, hidden, stream);
  }
}

}  // namespace

void bias_gelu_fwd(const void* pre, const void* bias, DType bias_dtype, void* out, DType dtype, int64_t rows,
                   int64_t hidden, bool tanh_form, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch<T, false>(static_cast<const T*>(pre), bias, bias_dtype, nullptr, static_cast<T*>(out), rows, hidden,
                     tanh_form, stream);
  });
}

void bias_gelu_bwd(const void* grad, const void* pre, const void* bias, DType bias_dtype, void* grad_pre, DType dtype,
                   int64_t rows, int64_t hidden, bool tanh_form, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch<T, true>(static_cast<const T*>(pre), bias, bias_dtype, static_cast<const T*>(grad),
                    static_cast<T*>(grad_pre), rows, hidden, tanh_form, stream);
  });
}

}  // namespace cuda
}  // namespace fastvit
