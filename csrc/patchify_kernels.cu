// Patchify: (B, C, H, W) images, any strides (NCHW, channels_last, views) -> the (B * N, C * p * p)
// patch matrix that patch embedding multiplies by the flattened Conv2d weight (D, C * p * p), converting
// the dtype on the way; and the inverse (unpatchify: patch matrix -> contiguous image), which is
// what the backward needs for dx. Index maps from row_math.h (patch_column_to_pixel), which the CPU
// loops also run.
//
// The map is separable: pixel offset(row, col) = base(row) + off(col), with base(row) the offset of
// the patch's top-left pixel of channel 0 and off(col) = c * stride_c + ky * stride_h + kx * stride_w.
// A block takes a tile of kTileRows consecutive rows; 32 threads compute base() of the tile's rows
// (one patch_column_to_pixel each) into shared memory, then every thread walks its columns col = t,
// t + T, ... (T = blockDim.x) and for each column all the tile's rows. A column's (c, ky, kx) comes
// from patch_column_to_pixel once per thread and advances by T's (dc, dky, dkx) with two carries, so
// the inner loop has no division. Consecutive threads touch consecutive columns: the patch matrix
// side is fully coalesced; the image side reads (writes) runs of p contiguous pixels for NCHW and
// stride-C gathers for channels_last. Offsets are int64.

#include <algorithm>
#include <cstdint>

#include "launchers.h"
#include "row_math.h"

namespace fastvit {
namespace cuda {
namespace {

using detail::dispatch_dtype;

constexpr int kTileRows = 32;
constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGrid = 1 << 30;

// Launch: block T = min(256, cols rounded up to 32) threads, grid min(ceil(rows / kTileRows), 2^30);
// blocks stride over row tiles.
//   kToImage = false: src = image (B, C, H, W) TS with strides `s`; dst = (rows, cols) TD, row stride mat_stride
//   kToImage = true:  src = (rows, cols) TS, row stride mat_stride; dst = image TD with strides `s`
// rows = B * N, cols = C * p * p (geometry g).
template <typename TS, typename TD, bool kToImage>
__global__ void __launch_bounds__(kMaxThreads)
    patch_transform_kernel(const TS* __restrict__ src, TD* __restrict__ dst, PatchGeometry g, ImageStrides s,
                           int64_t mat_stride, int64_t rows) {
  __shared__ int64_t row_base[kTileRows];
  const int tid = static_cast<int>(threadIdx.x);
  int64_t unused, c0, ky0, kx0, dc, dky, dkx;
  patch_column_to_pixel(g, 0, tid, unused, c0, ky0, kx0);         // row 0's patch starts at (0, 0)
  patch_column_to_pixel(g, 0, blockDim.x, unused, dc, dky, dkx);  // one step of T columns
  for (int64_t tile = blockIdx.x; tile * kTileRows < rows; tile += gridDim.x) {
    const int64_t row0 = tile * kTileRows;
    const int tile_rows = static_cast<int>(rows - row0 < kTileRows ? rows - row0 : kTileRows);
    __syncthreads();  // the previous tile's readers of row_base are done
    if (tid < tile_rows) {
      int64_t b, c, y, x;
      patch_column_to_pixel(g, row0 + tid, 0, b, c, y, x);
      row_base[tid] = b * s.batch + y * s.height + x * s.width;
    }
    __syncthreads();
    int64_t c = c0, ky = ky0, kx = kx0;
    for (int64_t col = tid; col < g.cols; col += blockDim.x) {
      const int64_t col_off = c * s.channel + ky * s.height + kx * s.width;
      const int64_t mat0 = row0 * mat_stride + col;
#pragma unroll 4
      for (int r = 0; r < tile_rows; ++r) {
        const int64_t pix = row_base[r] + col_off;
        const int64_t mat = mat0 + r * mat_stride;
        if constexpr (kToImage) {
          dst[pix] = detail::from_float<TD>(detail::to_float(src[mat]));
        } else {
          dst[mat] = detail::from_float<TD>(detail::to_float(src[pix]));
        }
      }
      // advance (c, ky, kx) by T columns: dkx, dky < p, so one carry each
      kx += dkx;
      if (kx >= g.patch) {
        kx -= g.patch;
        ++ky;
      }
      ky += dky;
      if (ky >= g.patch) {
        ky -= g.patch;
        ++c;
      }
      c += dc;
    }
  }
}

template <bool kToImage>
void launch(const void* src, DType src_dtype, void* dst, DType dst_dtype, const PatchGeometry& g,
            const ImageStrides& s, int64_t mat_stride, cudaStream_t stream) {
  const int64_t rows = g.batch * g.tokens;
  if (rows == 0 || g.cols == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (g.cols + 31) / 32 * 32));
  const int grid = static_cast<int>(std::min<int64_t>((rows + kTileRows - 1) / kTileRows, kMaxGrid));
  dispatch_dtype(src_dtype, [&](auto* stag) {
    using TS = std::remove_pointer_t<decltype(stag)>;
    dispatch_dtype(dst_dtype, [&](auto* dtag) {
      using TD = std::remove_pointer_t<decltype(dtag)>;
      patch_transform_kernel<TS, TD, kToImage>
          <<<grid, threads, 0, stream>>>(static_cast<const TS*>(src), static_cast<TD*>(dst), g, s, mat_stride, rows);
    });
  });
}

}  // namespace

void patchify(const void* image, DType image_dtype, ImageStrides strides, int64_t batch, int64_t channels,
              int64_t height, int64_t width, int64_t patch, void* cols, DType out_dtype, cudaStream_t stream) {
  const PatchGeometry g = make_patch_geometry(batch, channels, height, width, patch);
  launch<false>(image, image_dtype, cols, out_dtype, g, strides, g.cols, stream);
}

void unpatchify(const void* cols, int64_t cols_row_stride, DType cols_dtype, int64_t batch, int64_t channels,
                int64_t height, int64_t width, int64_t patch, void* image, DType out_dtype, cudaStream_t stream) {
  const PatchGeometry g = make_patch_geometry(batch, channels, height, width, patch);
  const ImageStrides contiguous{channels * height * width, height * width, width, 1};
  launch<true>(cols, cols_dtype, image, out_dtype, g, contiguous, cols_row_stride, stream);
}

}  // namespace cuda
}  // namespace fastvit
