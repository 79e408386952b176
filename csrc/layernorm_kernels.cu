// LayerNorm forward and backward over the last dim of a (rows, D) matrix, fp32 statistics.
//
// Forward (layer_norm_fwd_kernel): a "row group" of T threads (a power of two: one warp for D <= 1024
// at 32 values per thread, else up to 16 warps) owns one row at a time and holds it in registers,
// each thread ITEMS chunks of VEC elements (VEC * sizeof(T) = 16 bytes on the vector path; VEC = 1 and
// 16 values per thread on the scalar path, for misaligned rows or D % VEC != 0); chunk i of thread t
// is columns [(i * T + t) * VEC, +VEC), so a warp's loads are contiguous. Blocks of 256 threads hold
// 256 / T row groups (several rows per block for narrow D); a row group spanning warps reduces
// through shared memory. Two passes over the registers give the mean, then the sum of squared
// deviations (no cancellation, unlike the sum of squares); the row is written once, normalised, in
// the output dtype. Rows too wide for the registers (D > 16384, scalar path D > 8192) run a looped
// kernel that re-reads the row from global memory (L2) for each pass.
//
// Backward (layer_norm_bwd_kernel), after Apex's cuComputeGradInput + cuComputePartGradGammaBeta /
// cuComputeGradGammaBeta, fused: row groups as above with 16 values per thread (x, grad_y and two
// partial sums live in registers: one warp for D <= 512, 16 warps up to D = 8192; wider rows run a
// looped kernel) recompute xhat from the saved mean and rstd,
// reduce c1 = mean(g_hat * xhat) and c2 = mean(g_hat) (g_hat = grad_y * weight) across the row
// group, write dx (plus an optional residual gradient, added in fp32: the skip connection's, so the
// caller needs no second pass over dx), and accumulate grad_y * xhat and grad_y for their own
// columns in registers over all the rows they visit (a fixed, grid-strided set). At the end each
// block sums its row groups in a fixed order and writes one fp32 partial row of dweight and of
// dbias; a second kernel (layer_norm_param_grad_kernel) reduces the partial rows per column,
// threads along D (coalesced), in a fixed order. x and grad_y are read once (PyTorch's and Apex's
// column kernels read them a second time), and the result is deterministic: the number of partial
// rows depends only on the shape, the dtypes and the SM count.
//
// Dtypes: x/grad/y in {f16, bf16, f32} with the pairs of dtype_pair_supported (7 pairs); weight and
// bias arrive as float32 (ops_cuda.cpp converts those D-vectors).

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "row_math.h"

namespace fastvit {
namespace cuda {
namespace {

using detail::dispatch_dtype;
using detail::kPairSupported;
using detail::load_floats;
using detail::load_floats_as;
using detail::load_floats_or;
using detail::next_pow2;
using detail::row_group_sum;
using detail::store_floats;

constexpr int kMaxThreads = 512;          // the widest row group (and block) of the register kernels
constexpr int kRowBlockThreads = 256;     // threads per block when several row groups share a block
constexpr int kFwdElems = 32;             // forward: row values per thread held in registers (16-byte loads)
constexpr int kFwdScalarElems = 16;       // forward, scalar path (32 scalar loads per thread spill)
constexpr int kBwdElems = 16;             // backward: per thread x, grad_y and two partial sums
constexpr int kBwdSharedDim = kRowBlockThreads / 2 * kBwdElems;  // widest D with >1 row group per block
constexpr int kLoopThreads = 512;         // looped kernels: one row per block
constexpr int kTargetThreadsPerSm = 1024;  // backward grid: resident threads aimed for per SM
constexpr int64_t kMaxGrid = 1 << 30;

static_assert(kMaxThreads * kFwdElems == kLayerNormFwdRegisterMaxDim, "forward register capacity");
static_assert(kMaxThreads * kBwdElems == kLayerNormBwdRegisterMaxDim, "backward register capacity");

// Geometry of the register kernels: T threads per row (a power of two >= 32), R row groups per block.
struct RowGeometry {
  int threads;  // T = blockDim.x
  int groups;   // R = blockDim.y
};

RowGeometry row_geometry(int64_t dim, int elems_per_thread) {
  const int64_t per_thread = (dim + elems_per_thread - 1) / elems_per_thread;  // = ceil(chunks / ITEMS)
  const int threads = std::max(32, next_pow2(per_thread));
  return RowGeometry{threads, std::max(1, kRowBlockThreads / threads)};
}

// ---- forward ------------------------------------------------------------------------------------

// Launch: block (T, R), grid min(ceil(rows / R), kMaxGrid); blocks stride over rows.
//   x:      (rows, dim) TIn, row stride x_row_stride; on the vector path 16-byte aligned rows, dim % VEC == 0
//   weight, bias: (dim,) float32 or null;  y: (rows, dim) TOut contiguous;  mean_out, rstd_out: (rows,)
template <typename TIn, typename TOut, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_fwd_kernel(const TIn* __restrict__ x, int64_t x_row_stride, const float* __restrict__ weight,
                          const float* __restrict__ bias, int64_t rows, int dim, float eps, TOut* __restrict__ y,
                          float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  __shared__ float scratch[32];
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const int chunks = dim / VEC;
  const float fdim = static_cast<float>(dim);

  // The loop bound depends on blockIdx only: every thread of the block runs the same iterations, as
  // the __syncthreads in row_group_sum requires.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < rows;
    const TIn* xr = x + (valid ? row : 0) * x_row_stride;

    // 1. load the row chunks into registers, summing as they arrive
    float v[ITEMS][VEC];
    float sum[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * threads + tid;
      if (valid && c < chunks) {
        load_floats<VEC>(xr + static_cast<int64_t>(c) * VEC, v[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[0] += v[i][k];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = 0.0f;
      }
    }
    row_group_sum<1>(sum, scratch);
    const float mean = sum[0] / fdim;

    // 2. sum of squared deviations from the registers
    float m2[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (valid && i * threads + tid < chunks) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[i][k] - mean;
          m2[0] += d * d;
        }
      }
    }
    row_group_sum<1>(m2, scratch);
    const float rstd = layer_norm_rstd(m2[0] / fdim, eps);

    // 3. normalise, apply the affine parameters, store in the output dtype
    if (valid) {
      TOut* yr = y + row * dim;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = i * threads + tid;
        if (c < chunks) {
          float w[VEC], b[VEC], out[VEC];
          load_floats_or<VEC>(weight, c * VEC, 1.0f, w);
          load_floats_or<VEC>(bias, c * VEC, 0.0f, b);
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = layer_norm_apply(v[i][k], mean, rstd, w[k], b[k]);
          store_floats<VEC>(yr + static_cast<int64_t>(c) * VEC, out);
        }
      }
      if (tid == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
      }
    }
  }
}

// Rows wider than the registers hold: one block (kLoopThreads) per row, grid min(rows, kMaxGrid),
// three passes over the row in global memory (sum, squared deviations, apply). Pointers as above.
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kLoopThreads)
    layer_norm_fwd_looped_kernel(const TIn* __restrict__ x, int64_t x_row_stride, const float* __restrict__ weight,
                                 const float* __restrict__ bias, int64_t rows, int dim, float eps,
                                 TOut* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  __shared__ float scratch[32];
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const float fdim = static_cast<float>(dim);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const TIn* xr = x + row * x_row_stride;
    float sum[1] = {0.0f};
    for (int j = tid; j < dim; j += threads) sum[0] += detail::to_float(xr[j]);
    row_group_sum<1>(sum, scratch);
    const float mean = sum[0] / fdim;
    float m2[1] = {0.0f};
    for (int j = tid; j < dim; j += threads) {
      const float d = detail::to_float(xr[j]) - mean;
      m2[0] += d * d;
    }
    row_group_sum<1>(m2, scratch);
    const float rstd = layer_norm_rstd(m2[0] / fdim, eps);
    TOut* yr = y + row * dim;
    for (int j = tid; j < dim; j += threads) {
      const float w = weight != nullptr ? weight[j] : 1.0f;
      const float b = bias != nullptr ? bias[j] : 0.0f;
      yr[j] = detail::from_float<TOut>(layer_norm_apply(detail::to_float(xr[j]), mean, rstd, w, b));
    }
    if (tid == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

template <typename TIn, typename TOut>
void launch_fwd(const TIn* x, int64_t x_row_stride, const float* weight, const float* bias, int64_t rows, int dim,
                float eps, TOut* y, float* mean, float* rstd, cudaStream_t stream) {
  if (dim > kLayerNormFwdRegisterMaxDim) {
    const int grid = static_cast<int>(std::min<int64_t>(rows, kMaxGrid));
    layer_norm_fwd_looped_kernel<TIn, TOut>
        <<<grid, kLoopThreads, 0, stream>>>(x, x_row_stride, weight, bias, rows, dim, eps, y, mean, rstd);
    return;
  }
  constexpr int V = detail::vec16<TIn>();
  const bool vector = dim % V == 0 && x_row_stride % V == 0 && detail::is_aligned(x, 16) &&
                      (weight == nullptr || detail::is_aligned(weight, 16)) &&
                      (bias == nullptr || detail::is_aligned(bias, 16));
  const int elems = vector ? kFwdElems : kFwdScalarElems;
  const RowGeometry geo = row_geometry(dim, elems);
  const dim3 block(geo.threads, geo.groups);
  const int grid = static_cast<int>(std::min<int64_t>((rows + geo.groups - 1) / geo.groups, kMaxGrid));
  if (vector) {
    layer_norm_fwd_kernel<TIn, TOut, V, kFwdElems / V>
        <<<grid, block, 0, stream>>>(x, x_row_stride, weight, bias, rows, dim, eps, y, mean, rstd);
  } else if (dim <= kMaxThreads * kFwdScalarElems) {
    layer_norm_fwd_kernel<TIn, TOut, 1, kFwdScalarElems>
        <<<grid, block, 0, stream>>>(x, x_row_stride, weight, bias, rows, dim, eps, y, mean, rstd);
  } else {
    layer_norm_fwd_looped_kernel<TIn, TOut><<<static_cast<int>(std::min<int64_t>(rows, kMaxGrid)), kLoopThreads, 0,
                                              stream>>>(x, x_row_stride, weight, bias, rows, dim, eps, y, mean, rstd);
  }
}

// ---- backward -----------------------------------------------------------------------------------

// Stores dx = (LN term, already in dl) + residual for the row chunks a thread holds (chunk i at column
// (i * threads + tid) * VEC), rounded once to TX; res_row is the residual gradient's row of type TR
// (TR = void: none). The residual's dtype is switched on once per row, outside this loop. The LN term
// is finished in registers first (xhat dies there), so the residual loads do not compete with xhat,
// g_hat and the dweight/dbias accumulators for the scalar path's 128 registers.
template <typename TR, typename TX, int VEC, int ITEMS>
__device__ __forceinline__ void store_dx_row(TX* __restrict__ dxr, const TR* __restrict__ res_row,
                                             const float (&dl)[ITEMS][VEC], int tid, int threads, int chunks) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = i * threads + tid;
    if (c < chunks) {
      float out[VEC];
      if constexpr (std::is_void<TR>::value) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = dl[i][k];
      } else {
        load_floats<VEC>(res_row + static_cast<int64_t>(c) * VEC, out);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = layer_norm_add_residual(dl[i][k], out[k]);
      }
      store_floats<VEC>(dxr + static_cast<int64_t>(c) * VEC, out);
    }
  }
}

// Launch: block (T, R), grid G = layer_norm_bwd_partial_rows (<= ceil(rows / R)); blocks stride
// over rows, so block b visits rows b * R + ty, then + G * R, ...
//   grad:  (rows, dim) TG, row stride grad_row_stride (0 allowed)
//   x:     (rows, dim) TX, row stride x_row_stride;  weight: (dim,) float32 or null
//   mean, rstd: (rows,) float32;  dx: (rows, dim) TX contiguous, or null
//   residual: (rows, dim) residual_dtype (TX's or float32; a run-time switch, uniform over the grid, once
//             per row), row stride residual_row_stride (0 allowed), or null; on the vector path aligned like grad
//   partials: (2, G, dim) float32, or null: [0, b] = sum over block b's rows of grad * xhat, [1, b] of grad
// Steps per row: load x, grad (+ weight) chunks; xhat = (x - mean) rstd; accumulate the partials;
// g_hat = grad * weight; reduce sum(g_hat xhat), sum(g_hat) over the row group; dx = rstd (g_hat -
// xhat c1 - c2) + residual. After the rows: row groups of a block add their partials in order 0..R-1 (shared
// memory), and the block writes its partial rows.
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_bwd_kernel(const TG* __restrict__ grad, int64_t grad_row_stride, const TX* __restrict__ x,
                          int64_t x_row_stride, const float* __restrict__ weight, const float* __restrict__ mean,
                          const float* __restrict__ rstd, int64_t rows, int dim, TX* __restrict__ dx,
                          const void* __restrict__ residual, int64_t residual_row_stride, DType residual_dtype,
                          float* __restrict__ partials) {
  constexpr int ITEMS = kBwdElems / VEC;
  __shared__ float scratch[64];
  __shared__ float block_acc[2][kBwdSharedDim];
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const int chunks = dim / VEC;
  const float fdim = static_cast<float>(dim);

  float dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = db[i][k] = 0.0f;
  }

  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < rows;
    const int64_t r = valid ? row : 0;
    const TX* xr = x + r * x_row_stride;
    const TG* gr = grad + r * grad_row_stride;
    const float mu = mean[r];
    const float rs = rstd[r];

    float xh[ITEMS][VEC], gh[ITEMS][VEC];
    float sums[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * threads + tid;
      if (valid && c < chunks) {
        load_floats<VEC>(xr + static_cast<int64_t>(c) * VEC, xh[i]);
        load_floats<VEC>(gr + static_cast<int64_t>(c) * VEC, gh[i]);
        float w[VEC];
        load_floats_or<VEC>(weight, c * VEC, 1.0f, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[i][k] = (xh[i][k] - mu) * rs;
          dw[i][k] += gh[i][k] * xh[i][k];
          db[i][k] += gh[i][k];
          gh[i][k] *= w[k];
          sums[0] += gh[i][k] * xh[i][k];
          sums[1] += gh[i][k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[i][k] = gh[i][k] = 0.0f;
      }
    }
    row_group_sum<2>(sums, scratch);
    const float c1 = sums[0] / fdim;
    const float c2 = sums[1] / fdim;
    if (valid && dx != nullptr) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {  // gh becomes dx's LN term (chunks past the row end are not stored)
#pragma unroll
        for (int k = 0; k < VEC; ++k) gh[i][k] = layer_norm_grad_input(gh[i][k], xh[i][k], c1, c2, rs);
      }
      TX* dxr = dx + row * dim;
      const int64_t res_offset = row * residual_row_stride;
      // residual_dtype is TX's or float32 (launchers.h): at most two copies of the unrolled store, as
      // four (one per dtype) spill the scalar path
      if (residual == nullptr) {
        store_dx_row<void>(dxr, nullptr, gh, tid, threads, chunks);
      } else if (std::is_same<TX, float>::value || residual_dtype == DType::kFloat32) {
        store_dx_row<float>(dxr, static_cast<const float*>(residual) + res_offset, gh, tid, threads, chunks);
      } else {
        store_dx_row<TX>(dxr, static_cast<const TX*>(residual) + res_offset, gh, tid, threads, chunks);
      }
    }
  }

  if (partials == nullptr) return;
  float* part_w = partials + static_cast<int64_t>(blockIdx.x) * dim;
  float* part_b = part_w + static_cast<int64_t>(gridDim.x) * dim;
  if (blockDim.y == 1) {  // one row group: its registers are the block's partial rows
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = i * threads + tid;
      if (c < chunks) {
        store_floats<VEC>(part_w + c * VEC, dw[i]);
        store_floats<VEC>(part_b + c * VEC, db[i]);
      }
    }
    return;
  }
  // Several row groups (dim <= kBwdSharedDim): add them into shared memory in order 0, 1, ..., R-1.
  for (int g = 0; g < static_cast<int>(blockDim.y); ++g) {
    if (static_cast<int>(threadIdx.y) == g) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c = i * threads + tid;
        if (c < chunks) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const int j = c * VEC + k;
            block_acc[0][j] = g == 0 ? dw[i][k] : block_acc[0][j] + dw[i][k];
            block_acc[1][j] = g == 0 ? db[i][k] : block_acc[1][j] + db[i][k];
          }
        }
      }
    }
    __syncthreads();
  }
  const int flat = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  for (int j = flat; j < dim; j += static_cast<int>(blockDim.x * blockDim.y)) {
    part_w[j] = block_acc[0][j];
    part_b[j] = block_acc[1][j];
  }
}

// Rows wider than the registers hold: one block (kLoopThreads) per row group, grid G; two passes
// over the row in global memory (the c1/c2 sums, then dx + residual), the block's partial rows accumulated in
// place in `partials` (only this block touches them: first row written, later rows added).
template <typename TX, typename TG>
__global__ void __launch_bounds__(kLoopThreads)
    layer_norm_bwd_looped_kernel(const TG* __restrict__ grad, int64_t grad_row_stride, const TX* __restrict__ x,
                                 int64_t x_row_stride, const float* __restrict__ weight,
                                 const float* __restrict__ mean, const float* __restrict__ rstd, int64_t rows,
                                 int dim, TX* __restrict__ dx, const void* __restrict__ residual,
                                 int64_t residual_row_stride, DType residual_dtype, float* __restrict__ partials) {
  __shared__ float scratch[64];
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const float fdim = static_cast<float>(dim);
  float* part_w = partials != nullptr ? partials + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  float* part_b = partials != nullptr ? part_w + static_cast<int64_t>(gridDim.x) * dim : nullptr;
  if (part_w != nullptr && static_cast<int64_t>(blockIdx.x) >= rows) {  // a block without rows adds zero
    for (int j = tid; j < dim; j += threads) part_w[j] = part_b[j] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bool first = row == blockIdx.x;
    const TX* xr = x + row * x_row_stride;
    const TG* gr = grad + row * grad_row_stride;
    const float mu = mean[row];
    const float rs = rstd[row];
    float sums[2] = {0.0f, 0.0f};
    for (int j = tid; j < dim; j += threads) {
      const float xhat = (detail::to_float(xr[j]) - mu) * rs;
      const float g = detail::to_float(gr[j]);
      const float g_hat = weight != nullptr ? g * weight[j] : g;
      sums[0] += g_hat * xhat;
      sums[1] += g_hat;
      if (part_w != nullptr) {
        part_w[j] = first ? g * xhat : part_w[j] + g * xhat;
        part_b[j] = first ? g : part_b[j] + g;
      }
    }
    row_group_sum<2>(sums, scratch);
    if (dx != nullptr) {
      const float c1 = sums[0] / fdim;
      const float c2 = sums[1] / fdim;
      TX* dxr = dx + row * dim;
      const int64_t res_row = row * residual_row_stride;
      for (int j = tid; j < dim; j += threads) {
        const float xhat = (detail::to_float(xr[j]) - mu) * rs;
        const float g = detail::to_float(gr[j]);
        const float g_hat = weight != nullptr ? g * weight[j] : g;
        float dxj = layer_norm_grad_input(g_hat, xhat, c1, c2, rs);
        if (residual != nullptr) {
          float res[1];
          load_floats_as<1>(residual, residual_dtype, res_row + j, res);
          dxj = layer_norm_add_residual(dxj, res[0]);
        }
        dxr[j] = detail::from_float<TX>(dxj);
      }
    }
  }
}

// dweight / dbias from the partial rows. Launch: block (32, 16), grid (ceil(dim / 32), 2);
// blockIdx.y picks dweight (0) or dbias (1). Thread (tx, ty) sums rows ty, ty + 16, ... of its
// column (a warp reads 32 consecutive floats of a partial row), then the 16 per-column sums are
// added in order ty = 0..15 through shared memory.
//   partials: (2, parts, dim) float32;  dweight, dbias: (dim,) TP, or null (that half is skipped)
template <typename TP>
__global__ void __launch_bounds__(512)
    layer_norm_param_grad_kernel(const float* __restrict__ partials, int64_t parts, int dim, TP* __restrict__ dweight,
                                 TP* __restrict__ dbias) {
  __shared__ float tile[16][33];
  TP* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // uniform over the block
  const float* part = partials + static_cast<int64_t>(blockIdx.y) * parts * dim;
  const int col = static_cast<int>(blockIdx.x) * 32 + static_cast<int>(threadIdx.x);
  float s = 0.0f;
  if (col < dim) {
    int64_t r = threadIdx.y;
    // eight independent loads in flight (the partials were just written: L2 latency, not bandwidth,
    // bounds this loop); the adds stay in row order
    constexpr int kInFlight = 8;
    for (; r + 16 * (kInFlight - 1) < parts; r += 16 * kInFlight) {
      float v[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) v[k] = part[(r + 16 * k) * dim + col];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) s += v[k];
    }
    for (; r < parts; r += 16) s += part[r * dim + col];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < dim) {
    float t = 0.0f;
#pragma unroll
    for (int k = 0; k < 16; ++k) t += tile[k][threadIdx.x];
    out[col] = detail::from_float<TP>(t);
  }
}

// Rows per partial-sum block and grid size of the backward, shared by the workspace query and the launch.
struct BwdPlan {
  bool looped;
  RowGeometry geo;
  int64_t grid;  // = partial rows
};

BwdPlan bwd_plan(int64_t rows, int64_t dim, int sm_count) {
  const int64_t sms = std::max(1, sm_count);
  if (dim > kLayerNormBwdRegisterMaxDim) {
    return BwdPlan{true, RowGeometry{kLoopThreads, 1}, std::max<int64_t>(1, std::min(rows, 2 * sms))};
  }
  const RowGeometry geo = row_geometry(dim, kBwdElems);
  const int64_t block_threads = static_cast<int64_t>(geo.threads) * geo.groups;
  const int64_t blocks_needed = (rows + geo.groups - 1) / geo.groups;
  const int64_t resident = sms * std::max<int64_t>(1, kTargetThreadsPerSm / block_threads);
  return BwdPlan{false, geo, std::max<int64_t>(1, std::min(blocks_needed, resident))};
}

template <typename TX, typename TG>
void launch_bwd(const TG* grad, int64_t grad_row_stride, const TX* x, int64_t x_row_stride, const float* weight,
                const float* mean, const float* rstd, int64_t rows, int dim, TX* dx, const void* residual,
                int64_t residual_row_stride, DType residual_dtype, float* partials, const BwdPlan& plan,
                cudaStream_t stream) {
  const int grid = static_cast<int>(plan.grid);
  if (plan.looped) {
    layer_norm_bwd_looped_kernel<TX, TG><<<grid, kLoopThreads, 0, stream>>>(
        grad, grad_row_stride, x, x_row_stride, weight, mean, rstd, rows, dim, dx, residual, residual_row_stride,
        residual_dtype, partials);
    return;
  }
  constexpr int V = detail::vec16<TX>();
  const dim3 block(plan.geo.threads, plan.geo.groups);
  // the residual is read in V-element packs too: its rows must start on a pack boundary, else the scalar path
  const bool residual_vector =
      residual == nullptr ||
      (residual_row_stride % V == 0 &&
       detail::is_aligned(residual, std::min<int64_t>(16, V * dtype_size(residual_dtype))));
  const bool vector = dim % V == 0 && x_row_stride % V == 0 && grad_row_stride % V == 0 &&
                      detail::is_aligned(x, 16) && detail::is_aligned(grad, std::min<int64_t>(16, V * sizeof(TG))) &&
                      (weight == nullptr || detail::is_aligned(weight, 16)) && residual_vector;
  if (vector) {
    layer_norm_bwd_kernel<TX, TG, V><<<grid, block, 0, stream>>>(grad, grad_row_stride, x, x_row_stride, weight,
                                                                 mean, rstd, rows, dim, dx, residual,
                                                                 residual_row_stride, residual_dtype, partials);
  } else {
    layer_norm_bwd_kernel<TX, TG, 1><<<grid, block, 0, stream>>>(grad, grad_row_stride, x, x_row_stride, weight,
                                                                 mean, rstd, rows, dim, dx, residual,
                                                                 residual_row_stride, residual_dtype, partials);
  }
}

}  // namespace

void layer_norm_fwd(const void* x, int64_t x_row_stride, DType x_dtype, const float* weight, const float* bias,
                    int64_t rows, int64_t dim, float eps, void* y, DType y_dtype, float* mean, float* rstd,
                    cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  dispatch_dtype(x_dtype, [&](auto* xtag) {
    using TIn = std::remove_pointer_t<decltype(xtag)>;
    dispatch_dtype(y_dtype, [&](auto* ytag) {
      using TOut = std::remove_pointer_t<decltype(ytag)>;
      if constexpr (kPairSupported<TIn, TOut>) {
        launch_fwd<TIn, TOut>(static_cast<const TIn*>(x), x_row_stride, weight, bias, rows, static_cast<int>(dim),
                              eps, static_cast<TOut*>(y), mean, rstd, stream);
      }
    });
  });
}

int64_t layer_norm_bwd_partial_rows(int64_t rows, int64_t dim, DType /*x_dtype*/, DType /*grad_dtype*/,
                                    int sm_count) {
  return bwd_plan(rows, dim, sm_count).grid;
}

void layer_norm_bwd(const void* grad_y, int64_t grad_row_stride, DType grad_dtype, const void* x,
                    int64_t x_row_stride, DType x_dtype, const float* weight, const float* mean, const float* rstd,
                    int64_t rows, int64_t dim, void* dx, const void* residual_grad, int64_t residual_row_stride,
                    DType residual_dtype, float* partials, int64_t partial_rows, void* dweight, void* dbias,
                    DType param_dtype, int sm_count, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;  // the caller zero-fills dweight / dbias
  const bool want_params = partials != nullptr && partial_rows > 0 && (dweight != nullptr || dbias != nullptr);
  if (dx == nullptr && !want_params) return;
  BwdPlan plan = bwd_plan(rows, dim, sm_count);
  if (want_params) plan.grid = partial_rows;  // one block per workspace row (the caller sized it from the plan)
  dispatch_dtype(x_dtype, [&](auto* xtag) {
    using TX = std::remove_pointer_t<decltype(xtag)>;
    dispatch_dtype(grad_dtype, [&](auto* gtag) {
      using TG = std::remove_pointer_t<decltype(gtag)>;
      if constexpr (kPairSupported<TX, TG>) {
        launch_bwd<TX, TG>(static_cast<const TG*>(grad_y), grad_row_stride, static_cast<const TX*>(x), x_row_stride,
                           weight, mean, rstd, rows, static_cast<int>(dim), static_cast<TX*>(dx),
                           dx != nullptr ? residual_grad : nullptr, residual_row_stride, residual_dtype,
                           want_params ? partials : nullptr, plan, stream);
      }
    });
  });
  if (!want_params) return;
  const dim3 grid(static_cast<unsigned>((dim + 31) / 32), 2);
  const dim3 block(32, 16);
  dispatch_dtype(param_dtype, [&](auto* ptag) {
    using TP = std::remove_pointer_t<decltype(ptag)>;
    layer_norm_param_grad_kernel<TP><<<grid, block, 0, stream>>>(partials, partial_rows, static_cast<int>(dim),
                                                                 static_cast<TP*>(dweight), static_cast<TP*>(dbias));
  });
}

}  // namespace cuda
}  // namespace fastvit
