// The scaled residual add that closes a ViT block's MLP half:
//   out[r, j] = residual[r, j] + sample_scale[r / rows_per_sample] * layer_scale[j] * branch[r, j]
// (timm's LayerScale gamma and drop-path's per-sample factor), each term optional, fp32 math through
// row_math.h's scaled_residual_value, out contiguous in its own dtype (timm's fp32 residual stream
// beside a bf16 branch stays fp32).
//
// Layout as bias_gelu_kernels.cu: 2-D over (column vector, row); a thread keeps its layer_scale
// vector in registers and walks rows with a grid stride, kUnrollRows rows of loads in flight. VEC = 16
// bytes of the narrowest dtype involved (8 for a bf16 branch beside an fp32 residual: the fp32 side
// moves as two 16-byte accesses) when dim % VEC == 0, the row strides are multiples of VEC and the
// pointers are 16-byte aligned; else VEC = 1.
//
// Dtype combinations with kernels: (branch, residual, out) = (T, T, T) for every T, (f16|bf16, f32,
// f32), and (f32, f32, any out); scaled_residual_supported says so and the caller upcasts the others.

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

template <typename TB, typename TR, typename TO>
constexpr bool kHasKernel = (std::is_same<TB, TR>::value && std::is_same<TR, TO>::value) ||
                            (std::is_same<TR, float>::value && std::is_same<TO, float>::value) ||
                            (std::is_same<TB, float>::value && std::is_same<TR, float>::value);

template <typename A, typename B, typename C>
constexpr int narrowest_vec() {
  constexpr size_t a = sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B);
  return static_cast<int>(16 / (a < sizeof(C) ? a : sizeof(C)));
}

// Launch: block (bx, by), bx * by = kBlockThreads, bx = min(256, dim vectors rounded up to 32);
// grid (ceil(dim vectors / bx), min(ceil(rows / (by * kUnrollRows)), 65535)).
//   branch:   (rows, dim) TB, row stride branch_stride
//   residual: (rows, dim) TR, row stride residual_stride, or null
//   layer_scale: (dim,) ls_dtype or null;  sample_scale: (rows / rows_per_sample,) ss_dtype or null
//   (the scales are small and read through a run-time dtype switch: no instantiations for them)
//   out:      (rows, dim) TO contiguous
template <typename TB, typename TR, typename TO, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    scaled_residual_kernel(const TB* __restrict__ branch, int64_t branch_stride, const TR* __restrict__ residual,
                           int64_t residual_stride, const void* __restrict__ layer_scale, DType ls_dtype,
                           const void* __restrict__ sample_scale, DType ss_dtype, int64_t rows_per_sample,
                           int64_t rows, int64_t dim, TO* __restrict__ out) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= dim) return;  // no block-level synchronisation below
  float ls[VEC];
  detail::load_floats_as_or<VEC>(layer_scale, ls_dtype, col, 1.0f, ls);
  constexpr int kUnroll = kUnrollRows<VEC>;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row0 < rows;
       row0 += row_step * kUnroll) {
    float br[kUnroll][VEC];
    float res[kUnroll][VEC];
    float ss[kUnroll];
    // 1. loads of up to kUnroll rows
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = row0 + u * row_step;
      if (row < rows) {
        load_floats<VEC>(branch + row * branch_stride + col, br[u]);
        if (residual != nullptr) {
          load_floats<VEC>(residual + row * residual_stride + col, res[u]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) res[u][k] = 0.0f;
        }
        ss[u] = 1.0f;
        if (sample_scale != nullptr) {
          float s1[1];
          detail::load_floats_as<1>(sample_scale, ss_dtype, row / rows_per_sample, s1);
          ss[u] = s1[0];
        }
      }
    }
    // 2. fp32 math, store
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = row0 + u * row_step;
      if (row < rows) {
        float o[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = scaled_residual_value(br[u][k], res[u][k], ls[k], ss[u]);
        store_floats<VEC>(out + row * dim + col, o);
      }
    }
  }
}

template <typename TB, typename TR, typename TO>
void launch(const TB* branch, int64_t branch_stride, const TR* residual, int64_t residual_stride,
            const void* layer_scale, DType ls_dtype, const void* sample_scale, DType ss_dtype,
            int64_t rows_per_sample, int64_t rows, int64_t dim, TO* out, cudaStream_t stream) {
  constexpr int V = narrowest_vec<TB, TR, TO>();
  const bool vector = dim % V == 0 && branch_stride % V == 0 && detail::is_aligned(branch, 16) &&
                      detail::is_aligned(out, 16) &&
                      (residual == nullptr || (residual_stride % V == 0 && detail::is_aligned(residual, 16))) &&
                      (layer_scale == nullptr ||
                       detail::is_aligned(layer_scale, std::min<int64_t>(16, V * dtype_size(ls_dtype))));
  const int64_t vectors = vector ? dim / V : dim;
  const int bx = static_cast<int>(std::min<int64_t>(kBlockThreads, (vectors + 31) / 32 * 32));
  const int by = kBlockThreads / bx;
  const dim3 block(bx, by);
  const int64_t rows_per_block = static_cast<int64_t>(by) * (vector ? kUnrollRows<V> : kUnrollRows<1>);
  const dim3 grid(static_cast<unsigned>((vectors + bx - 1) / bx),
                  static_cast<unsigned>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, kMaxGridY)));
  if (vector) {
    scaled_residual_kernel<TB, TR, TO, V><<<grid, block, 0, stream>>>(
        branch, branch_stride, residual, residual_stride, layer_scale, ls_dtype, sample_scale, ss_dtype,
        rows_per_sample, rows, dim, out);
  } else {
    scaled_residual_kernel<TB, TR, TO, 1><<<grid, block, 0, stream>>>(
        branch, branch_stride, residual, residual_stride, layer_scale, ls_dtype, sample_scale, ss_dtype,
        rows_per_sample, rows, dim, out);
  }
}

// The residual type parameter of the instantiation used without a residual (the pointer is null and
// the type unused): the output dtype when the branch has it, else float32.
DType residual_type_without_residual(DType branch_dtype, DType out_dtype) {
  return branch_dtype == out_dtype ? out_dtype : DType::kFloat32;
}

}  // namespace

bool scaled_residual_supported(DType branch_dtype, DType residual_dtype, bool has_residual, DType out_dtype) {
  if (!has_residual) residual_dtype = residual_type_without_residual(branch_dtype, out_dtype);
  if (branch_dtype == residual_dtype && residual_dtype == out_dtype) return true;
  if (residual_dtype == DType::kFloat32 && out_dtype == DType::kFloat32) return true;
  return branch_dtype == DType::kFloat32 && residual_dtype == DType::kFloat32;
}

void scaled_residual(const void* branch, int64_t branch_row_stride, DType branch_dtype, const void* residual,
                     int64_t residual_row_stride, DType residual_dtype, const void* layer_scale,
                     DType layer_scale_dtype, const void* sample_scale, DType sample_scale_dtype,
                     int64_t rows_per_sample, int64_t rows, int64_t dim, void* out, DType out_dtype,
                     cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  if (residual == nullptr) residual_dtype = residual_type_without_residual(branch_dtype, out_dtype);
  if (rows_per_sample < 1) rows_per_sample = 1;
  dispatch_dtype(branch_dtype, [&](auto* btag) {
    using TB = std::remove_pointer_t<decltype(btag)>;
    dispatch_dtype(residual_dtype, [&](auto* rtag) {
      using TR = std::remove_pointer_t<decltype(rtag)>;
      dispatch_dtype(out_dtype, [&](auto* otag) {
        using TO = std::remove_pointer_t<decltype(otag)>;
        if constexpr (kHasKernel<TB, TR, TO>) {
          launch<TB, TR, TO>(static_cast<const TB*>(branch), branch_row_stride, static_cast<const TR*>(residual),
                             residual_row_stride, layer_scale, layer_scale_dtype, sample_scale,
                             sample_scale_dtype, rows_per_sample, rows, dim, static_cast<TO*>(out), stream);
        }
      });
    });
  });
}

}  // namespace cuda
}  // namespace fastvit
