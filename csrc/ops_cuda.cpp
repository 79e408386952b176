// The CUDA implementations of the fastvit_C block ops (schemas in ops.cpp / csrc/README.md), registered
// for the CUDA dispatch key. Each one: checks its internal invariants (the Python layer, fastvit.ops,
// validates user input), makes the device current, brings operands to what the kernels read (a unit
// last stride, fp32 LayerNorm parameters, a supported dtype pair: each only when needed, never a
// copy of a conforming tensor), allocates the outputs (and the LayerNorm backward's fp32 workspace)
// through the caching allocator, launches on the current stream, and checks the launch.
//
// The kernels are in *_kernels.cu behind the raw-pointer launchers of launchers.h. Compiled only in
// CUDA builds (-DFASTVIT_WITH_CUDA); includes ATen's and c10/cuda's headers, not torch/extension.h (slow
// to compile) nor ATen/cuda/CUDAContext.h (it pulls in cuBLAS/cuSPARSE headers, which a bare toolkit
// such as nvcc-only installs lacks).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "launchers.h"

namespace fastvit {
namespace {

using cuda::DType;
using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

bool is_block_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

DType to_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(is_block_dtype(t), "fastvit_C::", op, ": ", name, " must be float16, bfloat16 or float32, got ", t);
  return t == at::kHalf ? DType::kFloat16 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fastvit_C::", op, ": ", name, " must be on ", device, ", got ", t.device());
}

// A (rows, cols) matrix whose last dim the kernels read with unit stride: returned as is when it
// has one (or cols <= 1); an expanded one (strides (0, 0): a scalar gradient broadcast) becomes one
// materialised row expanded again (row stride 0, which the kernels take); anything else a copy.
at::Tensor unit_last_stride(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastvit_C::", op, ": ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  if (cols <= 1 || t.stride(1) == 1) return t;
  if (t.stride(0) == 0 && rows > 0) return t.select(0, 0).contiguous().expand({rows, cols});
  return t.contiguous();
}

// Row stride in elements of a unit-last-stride matrix (that of a single row is irrelevant: report
// the packed one so the vector paths' stride test passes).
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// A (n,) parameter as fp32, contiguous and 16-byte aligned (what the LayerNorm kernels load with
// float4), or an undefined tensor when not given.
at::Tensor float_vector(const char* op, const char* name, const OptTensor& t, int64_t n, const at::Device& device) {
  if (!given(t)) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastvit_C::", op, ": ", name, " must have shape (", n, ",), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastvit_C::", op, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  check_cuda(op, name, *t, device);
  at::Tensor f = t->to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(f.const_data_ptr()) % 16 != 0) f = f.clone();
  return f;
}

// A (n,) vector the kernels read through a run-time dtype switch (bias, layer_scale, sample_scale):
// kept in its own dtype when that is fp16/bf16/fp32 and it is contiguous, else converted to fp32.
at::Tensor small_vector(const char* op, const char* name, const OptTensor& t, int64_t n, const at::Device& device) {
  if (!given(t)) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastvit_C::", op, ": ", name, " must have shape (", n, ",), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastvit_C::", op, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  check_cuda(op, name, *t, device);
  if (!is_block_dtype(t->scalar_type())) return t->to(at::kFloat).contiguous();
  return t->contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

DType dtype_or_f32(const at::Tensor& t) {
  return t.defined() ? to_dtype("fastvit_C", "vector", t.scalar_type()) : DType::kFloat32;
}

bool parse_approximate(const char* op, std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "fastvit_C::", op,
              ": approximate must be \"none\" or \"tanh\", got \"", std::string(approximate), "\"");
  return approximate == "tanh";
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// SM count of the current device, queried once per device.
int current_sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int device = c10::cuda::current_device();
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// ---- LayerNorm ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const OptTensor& weight,
                                                                   const OptTensor& bias, double eps,
                                                                   at::ScalarType out_dtype) {
  constexpr const char* op = "layer_norm_fwd";
  TORCH_CHECK(x.dim() == 2, "fastvit_C::layer_norm_fwd: x must be (rows, D), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), dim = x.size(1);
  DType x_dtype = to_dtype(op, "x", x.scalar_type());
  const DType y_dtype = to_dtype(op, "out_dtype", out_dtype);
  at::Tensor xs = x;
  if (!cuda::dtype_pair_supported(x_dtype, y_dtype)) {  // fp16 <-> bf16: the exact fp32 upcast has a kernel
    xs = x.to(at::kFloat);
    x_dtype = DType::kFloat32;
  }
  xs = unit_last_stride(op, "x", xs, rows, dim);
  const at::Tensor w = float_vector(op, "weight", weight, dim, x.device());
  const at::Tensor b = float_vector(op, "bias", bias, dim, x.device());
  at::Tensor y = at::empty({rows, dim}, x.options().dtype(out_dtype));
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  if (dim == 0) {  // empty rows: the CPU loop's statistics of no values (mean 0, variance 0), not garbage
    mean.zero_();
    rstd.fill_(1.0f / std::sqrt(0.0f + static_cast<float>(eps)));
    return {y, mean, rstd};
  }
  cuda::layer_norm_fwd(xs.const_data_ptr(), row_stride(xs), x_dtype,
                       w.defined() ? w.const_data_ptr<float>() : nullptr,
                       b.defined() ? b.const_data_ptr<float>() : nullptr, rows, dim, static_cast<float>(eps),
                       y.data_ptr(), y_dtype, mean.data_ptr<float>(), rstd.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const OptTensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd,
                                                                   std::array<bool, 3> output_mask,
                                                                   const OptTensor& residual_grad) {
  constexpr const char* op = "layer_norm_bwd";
  TORCH_CHECK(x.dim() == 2, "fastvit_C::layer_norm_bwd: x must be (rows, D), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), dim = x.size(1);
  const DType x_dtype = to_dtype(op, "x", x.scalar_type());
  DType g_dtype = to_dtype(op, "grad_y", grad_y.scalar_type());
  check_cuda(op, "grad_y", grad_y, x.device());
  check_cuda(op, "mean", mean, x.device());
  check_cuda(op, "rstd", rstd, x.device());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              "fastvit_C::layer_norm_bwd: mean and rstd must be (", rows, ",) float32, got ", mean.sizes(), " ",
              mean.scalar_type(), " and ", rstd.sizes(), " ", rstd.scalar_type());
  const at::ScalarType param_dtype = given(weight) ? weight->scalar_type() : x.scalar_type();
  const DType p_dtype = to_dtype(op, "dweight/dbias (weight's dtype, x's without weight)", param_dtype);

  at::Tensor gs = grad_y;
  if (!cuda::dtype_pair_supported(x_dtype, g_dtype)) {  // fp16 <-> bf16: upcast the gradient (exact)
    gs = grad_y.to(at::kFloat);
    g_dtype = DType::kFloat32;
  }
  gs = unit_last_stride(op, "grad_y", gs, rows, dim);
  const at::Tensor xs = unit_last_stride(op, "x", x, rows, dim);
  const at::Tensor w = float_vector(op, "weight", weight, dim, x.device());
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  // residual_grad: read in its row stride (0 too) and in x's dtype or fp32 (another one is upcast, exactly),
  // added to dx in fp32
  at::Tensor res;
  DType r_dtype = DType::kFloat32;
  if (given(residual_grad)) {
    r_dtype = to_dtype(op, "residual_grad", residual_grad->scalar_type());
    check_cuda(op, "residual_grad", *residual_grad, x.device());
    res = *residual_grad;
    if (!cuda::layer_norm_residual_supported(x_dtype, r_dtype)) {
      const bool one_row = res.dim() == 2 && res.size(0) == rows && res.size(1) == dim && rows > 1 &&
                           res.stride(0) == 0;  // broadcast over rows: upcast the one row, expand again
      res = one_row ? res.select(0, 0).to(at::kFloat).expand({rows, dim}) : res.to(at::kFloat);
      r_dtype = DType::kFloat32;
    }
    res = unit_last_stride(op, "residual_grad", res, rows, dim);
  }

  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  at::Tensor dx = need_dx ? at::empty({rows, dim}, x.options()) : at::empty({0}, x.options());
  at::Tensor dweight = at::empty({need_dw ? dim : 0}, x.options().dtype(param_dtype));
  at::Tensor dbias = at::empty({need_db ? dim : 0}, x.options().dtype(param_dtype));
  if (dim == 0 || !(need_dx || need_dw || need_db)) return {dx, dweight, dbias};
  if (rows == 0) {  // sums over no rows
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const int sm_count = current_sm_count();
  at::Tensor partials;
  int64_t parts = 0;
  if (need_dw || need_db) {
    parts = cuda::layer_norm_bwd_partial_rows(rows, dim, x_dtype, g_dtype, sm_count);
    partials = at::empty({2, parts, dim}, x.options().dtype(at::kFloat));
  }
  cuda::layer_norm_bwd(gs.const_data_ptr(), row_stride(gs), g_dtype, xs.const_data_ptr(), row_stride(xs), x_dtype,
                       w.defined() ? w.const_data_ptr<float>() : nullptr, mean_c.const_data_ptr<float>(),
                       rstd_c.const_data_ptr<float>(), rows, dim, need_dx ? dx.data_ptr() : nullptr,
                       res.defined() ? res.const_data_ptr() : nullptr, res.defined() ? row_stride(res) : 0, r_dtype,
                       partials.defined() ? partials.data_ptr<float>() : nullptr, parts,
                       need_dw ? dweight.data_ptr() : nullptr, need_db ? dbias.data_ptr() : nullptr, p_dtype,
                       sm_count, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dweight, dbias};
}

// ---- bias + GELU --------------------------------------------------------------------------------

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& pre, const OptTensor& bias, std::string_view approximate) {
  constexpr const char* op = "bias_gelu_fwd";
  const bool tanh_form = parse_approximate(op, approximate);
  TORCH_CHECK(pre.dim() == 2, "fastvit_C::bias_gelu_fwd: pre must be (rows, H), got ", pre.sizes());
  const c10::cuda::CUDAGuard guard(pre.device());
  const int64_t rows = pre.size(0), hidden = pre.size(1);
  const DType dtype = to_dtype(op, "pre", pre.scalar_type());
  const at::Tensor p = pre.contiguous();
  const at::Tensor b = small_vector(op, "bias", bias, hidden, pre.device());
  at::Tensor out = at::empty({rows, hidden}, pre.options());
  if (out.numel() == 0) return out;
  cuda::bias_gelu_fwd(p.const_data_ptr(), ptr_or_null(b), dtype_or_f32(b), out.data_ptr(), dtype, rows, hidden,
                      tanh_form, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bias_gelu_bwd_cuda(const at::Tensor& grad, const at::Tensor& pre, const OptTensor& bias,
                              std::string_view approximate) {
  constexpr const char* op = "bias_gelu_bwd";
  const bool tanh_form = parse_approximate(op, approximate);
  TORCH_CHECK(pre.dim() == 2, "fastvit_C::bias_gelu_bwd: pre must be (rows, H), got ", pre.sizes());
  const c10::cuda::CUDAGuard guard(pre.device());
  const int64_t rows = pre.size(0), hidden = pre.size(1);
  to_dtype(op, "pre", pre.scalar_type());
  to_dtype(op, "grad", grad.scalar_type());
  check_cuda(op, "grad", grad, pre.device());
  TORCH_CHECK(grad.sizes() == pre.sizes(), "fastvit_C::bias_gelu_bwd: grad must have pre's shape ", pre.sizes(),
              ", got ", grad.sizes());
  const at::Tensor b = small_vector(op, "bias", bias, hidden, pre.device());
  // Mixed dtypes (rare): run in fp32 (an exact upcast) and round once to pre's dtype, as the CPU loops.
  const bool mixed = grad.scalar_type() != pre.scalar_type();
  const at::Tensor p = mixed ? pre.to(at::kFloat).contiguous() : pre.contiguous();
  const at::Tensor g = mixed ? grad.to(at::kFloat).contiguous() : grad.contiguous();
  at::Tensor out = at::empty({rows, hidden}, p.options());
  if (out.numel() == 0) return out.to(pre.scalar_type());
  cuda::bias_gelu_bwd(g.const_data_ptr(), p.const_data_ptr(), ptr_or_null(b), dtype_or_f32(b), out.data_ptr(),
                      to_dtype(op, "pre", p.scalar_type()), rows, hidden, tanh_form, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mixed ? out.to(pre.scalar_type()) : out;
}

// ---- scaled residual ----------------------------------------------------------------------------

at::Tensor scaled_residual_cuda(const at::Tensor& branch, const OptTensor& residual, const OptTensor& layer_scale,
                                const OptTensor& sample_scale, int64_t rows_per_sample, at::ScalarType out_dtype) {
  constexpr const char* op = "scaled_residual";
  TORCH_CHECK(branch.dim() == 2, "fastvit_C::scaled_residual: branch must be (rows, D), got ", branch.sizes());
  const c10::cuda::CUDAGuard guard(branch.device());
  const int64_t rows = branch.size(0), dim = branch.size(1);
  DType b_dtype = to_dtype(op, "branch", branch.scalar_type());
  const DType o_dtype = to_dtype(op, "out_dtype", out_dtype);
  const bool has_res = given(residual);
  DType r_dtype = has_res ? to_dtype(op, "residual", residual->scalar_type()) : o_dtype;
  if (has_res) check_cuda(op, "residual", *residual, branch.device());
  at::Tensor bs = branch;
  at::Tensor rs = has_res ? *residual : at::Tensor();
  if (!cuda::scaled_residual_supported(b_dtype, r_dtype, has_res, o_dtype)) {  // exact fp32 upcasts
    bs = bs.to(at::kFloat);
    b_dtype = DType::kFloat32;
    if (has_res) {
      rs = rs.to(at::kFloat);
      r_dtype = DType::kFloat32;
    }
  }
  bs = unit_last_stride(op, "branch", bs, rows, dim);
  if (has_res) rs = unit_last_stride(op, "residual", rs, rows, dim);
  const at::Tensor ls = small_vector(op, "layer_scale", layer_scale, dim, branch.device());
  at::Tensor ss;
  if (given(sample_scale)) {
    TORCH_CHECK(rows_per_sample >= 1 && rows % rows_per_sample == 0, "fastvit_C::scaled_residual: rows_per_sample (",
                rows_per_sample, ") must be >= 1 and divide rows (", rows, ")");
    ss = small_vector(op, "sample_scale", sample_scale, rows / rows_per_sample, branch.device());
  }
  at::Tensor out = at::empty({rows, dim}, branch.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  cuda::scaled_residual(bs.const_data_ptr(), row_stride(bs), b_dtype, has_res ? rs.const_data_ptr() : nullptr,
                        has_res ? row_stride(rs) : 0, r_dtype, ptr_or_null(ls), dtype_or_f32(ls), ptr_or_null(ss),
                        dtype_or_f32(ss), std::max<int64_t>(rows_per_sample, 1), rows, dim, out.data_ptr(), o_dtype,
                        current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- patchify -----------------------------------------------------------------------------------

at::Tensor patchify_cuda(const at::Tensor& x, int64_t patch, at::ScalarType out_dtype) {
  constexpr const char* op = "patchify";
  const DType x_dtype = to_dtype(op, "x", x.scalar_type());
  const DType o_dtype = to_dtype(op, "out_dtype", out_dtype);
  TORCH_CHECK(x.dim() == 4, "fastvit_C::patchify: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(patch >= 1 && x.size(2) % patch == 0 && x.size(3) % patch == 0, "fastvit_C::patchify: H and W of x ",
              x.sizes(), " must be multiples of patch = ", patch);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), chans = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t rows = batch * (height / patch) * (width / patch);
  at::Tensor out = at::empty({rows, chans * patch * patch}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const cuda::ImageStrides strides{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  cuda::patchify(x.const_data_ptr(), x_dtype, strides, batch, chans, height, width, patch, out.data_ptr(), o_dtype,
                 current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& cols, c10::IntArrayRef image_size, int64_t patch,
                           at::ScalarType out_dtype) {
  constexpr const char* op = "unpatchify";
  const DType c_dtype = to_dtype(op, "cols", cols.scalar_type());
  const DType o_dtype = to_dtype(op, "out_dtype", out_dtype);
  TORCH_CHECK(image_size.size() == 4, "fastvit_C::unpatchify: image_size must be [B, C, H, W], got ", image_size);
  const int64_t batch = image_size[0], chans = image_size[1], height = image_size[2], width = image_size[3];
  TORCH_CHECK(patch >= 1 && height % patch == 0 && width % patch == 0, "fastvit_C::unpatchify: H and W of ",
              image_size, " must be multiples of patch = ", patch);
  const c10::cuda::CUDAGuard guard(cols.device());
  const int64_t rows = batch * (height / patch) * (width / patch);
  const at::Tensor cs = unit_last_stride(op, "cols", cols, rows, chans * patch * patch);
  at::Tensor out = at::empty({batch, chans, height, width}, cols.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  cuda::unpatchify(cs.const_data_ptr(), row_stride(cs), c_dtype, batch, chans, height, width, patch, out.data_ptr(),
                   o_dtype, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastvit

TORCH_LIBRARY_IMPL(fastvit_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastvit::layer_norm_bwd_cuda);
  m.impl("bias_gelu_fwd", &fastvit::bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &fastvit::bias_gelu_bwd_cuda);
  m.impl("scaled_residual", &fastvit::scaled_residual_cuda);
  m.impl("patchify", &fastvit::patchify_cuda);
  m.impl("unpatchify", &fastvit::unpatchify_cuda);
}
