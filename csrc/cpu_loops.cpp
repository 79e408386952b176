// CPU implementations of the fastvit_C block ops: plain loops over row_math.h, the same per-element and
// per-row math the CUDA kernels run, so CI (no GPU) tests it. Registered for the CPU key in ops.cpp;
// the semantics (shapes, strides, dtypes) are those of csrc/README.md.
//
// Every loop loads a row into a float32 buffer, computes in float32 and rounds once on the store.
// Rows are split over threads with at::parallel_for; reductions across rows (LayerNorm's dweight and
// dbias) sum fixed 64-row chunks and then the chunk partials in order, so the result does not depend
// on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>  // lean includes, not <ATen/ATen.h>: this file is on CI's compile-time path
#include <ATen/ops/empty.h>

#include <array>
#include <optional>
#include <string_view>
#include <vector>

#include "row_math.h"

namespace fastvit::cpu {
namespace {

constexpr int64_t kGrain = 16;          // rows per parallel_for task (rows are >= 37 values each)
constexpr int64_t kReduceChunk = 64;    // rows per fixed-order partial sum in layer_norm_bwd

// ---- dtype plumbing --------------------------------------------------------------------------------

void check_block_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastvit_C::", op, ": ", name,
              " must be float16, bfloat16 or float32, got ", dt);
}

void check_out_dtype(const char* op, at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastvit_C::", op,
              ": out_dtype must be float16, bfloat16 or float32, got ", dt);
}

// Calls f(T{}) with T the C++ type of dt (float, at::Half or at::BFloat16).
template <typename F>
void dispatch_float(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastvit_C: unsupported dtype ", dt);
  }
}

// n values of type dt at src (unit stride; stride 0 when broadcast) -> float32 dst.
void load_row(const void* src, at::ScalarType dt, int64_t n, int64_t stride, float* dst) {
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j * stride]);
  });
}

// float32 src -> n contiguous values of type dt at dst (rounded to nearest even).
void store_row(const float* src, at::ScalarType dt, int64_t n, void* dst) {
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(dst);
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(src[j]);
  });
}

// A (rows, cols) matrix with a unit column stride (or broadcast: 0) and any row stride.
struct RowMatrix {
  const char* data;
  int64_t row_stride_bytes;
  int64_t col_stride;  // 1, or 0 for a broadcast row
  at::ScalarType dtype;

  void load(int64_t row, int64_t n, float* dst) const {
    load_row(data + row * row_stride_bytes, dtype, n, col_stride, dst);
  }
};

RowMatrix row_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastvit_C::", op, ": ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  check_block_dtype(op, name, t);
  const int64_t col_stride = cols <= 1 ? 1 : t.stride(1);
  TORCH_CHECK(col_stride == 1 || col_stride == 0, "fastvit_C::", op, ": ", name,
              " needs a unit last-dim stride, got strides ", t.strides());
  return RowMatrix{static_cast<const char*>(t.const_data_ptr()), t.stride(0) * static_cast<int64_t>(t.element_size()),
                   col_stride, t.scalar_type()};
}

// An optional (n,) vector of any float dtype as a float32 array (empty when absent).
std::vector<float> vector_or_empty(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastvit_C::", op, ": ", name, " must have shape (", n, ",), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastvit_C::", op, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  const at::Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.const_data_ptr<float>(), f.const_data_ptr<float>() + n);
}

bool parse_approximate(const char* op, std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "fastvit_C::", op,
              ": approximate must be \"none\" or \"tanh\", got \"", std::string(approximate), "\"");
  return approximate == "tanh";
}

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastvit_C::", op, ": the CPU implementation got a tensor on ", t.device());
}

}  // namespace

// ---- LayerNorm -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              at::ScalarType out_dtype) {
  constexpr const char* op = "layer_norm_fwd";
  check_cpu(op, x);
  check_out_dtype(op, out_dtype);
  TORCH_CHECK(x.dim() == 2, "fastvit_C::layer_norm_fwd: x must be (rows, D), got ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1);
  const RowMatrix xm = row_matrix(op, "x", x, rows, dim);
  const std::vector<float> w = vector_or_empty(op, "weight", weight, dim);
  const std::vector<float> b = vector_or_empty(op, "bias", bias, dim);
  at::Tensor y = at::empty({rows, dim}, x.options().dtype(out_dtype));
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  char* y_ptr = static_cast<char*>(y.data_ptr());
  float* mean_ptr = mean.data_ptr<float>();
  float* rstd_ptr = rstd.data_ptr<float>();
  const int64_t y_row_bytes = dim * static_cast<int64_t>(y.element_size());
  const float epsf = static_cast<float>(eps);

  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim);
    for (int64_t r = begin; r < end; ++r) {
      xm.load(r, dim, buf.data());
      // four interleaved Welford lanes merged pairwise: the shape of a warp's shuffle reduction
      std::array<WelfordState, 4> lanes{welford_init(), welford_init(), welford_init(), welford_init()};
      for (int64_t j = 0; j < dim; ++j) welford_update(lanes[j & 3], buf[j]);
      const WelfordState s = welford_combine(welford_combine(lanes[0], lanes[1]), welford_combine(lanes[2], lanes[3]));
      const float mu = s.mean;
      const float rs = layer_norm_rstd(s.m2 / static_cast<float>(dim), epsf);
      for (int64_t j = 0; j < dim; ++j) {
        buf[j] = layer_norm_apply(buf[j], mu, rs, w.empty() ? 1.0f : w[j], b.empty() ? 0.0f : b[j]);
      }
      store_row(buf.data(), out_dtype, dim, y_ptr + r * y_row_bytes);
      mean_ptr[r] = mu;
      rstd_ptr[r] = rs;
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              std::array<bool, 3> output_mask,
                                                              const std::optional<at::Tensor>& residual_grad) {
  constexpr const char* op = "layer_norm_bwd";
  check_cpu(op, x);
  TORCH_CHECK(x.dim() == 2, "fastvit_C::layer_norm_bwd: x must be (rows, D), got ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1);
  const RowMatrix xm = row_matrix(op, "x", x, rows, dim);
  const RowMatrix gm = row_matrix(op, "grad_y", grad_y, rows, dim);
  const bool has_res = residual_grad.has_value() && residual_grad->defined();
  const RowMatrix rm = has_res ? row_matrix(op, "residual_grad", *residual_grad, rows, dim) : RowMatrix{};
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              "fastvit_C::layer_norm_bwd: mean and rstd must be (", rows, ",) float32, got ", mean.sizes(), " ",
              mean.scalar_type(), " and ", rstd.sizes(), " ", rstd.scalar_type());
  const std::vector<float> w = vector_or_empty(op, "weight", weight, dim);
  const at::ScalarType param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  TORCH_CHECK(param_dtype == at::kFloat || param_dtype == at::kHalf || param_dtype == at::kBFloat16,
              "fastvit_C::layer_norm_bwd: dweight/dbias take weight's dtype (x's without weight), which must be "
              "float16, bfloat16 or float32, got ", param_dtype);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const float* mean_ptr = mean_c.const_data_ptr<float>();
  const float* rstd_ptr = rstd_c.const_data_ptr<float>();
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];

  at::Tensor dx = need_dx ? at::empty({rows, dim}, x.options()) : at::empty({0}, x.options());
  char* dx_ptr = need_dx ? static_cast<char*>(dx.data_ptr()) : nullptr;
  const int64_t dx_row_bytes = dim * static_cast<int64_t>(x.element_size());
  const int64_t chunks = (rows + kReduceChunk - 1) / kReduceChunk;
  // per-chunk fp32 partials of dweight = sum grad_y * xhat and dbias = sum grad_y
  std::vector<float> part_w(need_dw ? chunks * dim : 0, 0.0f), part_b(need_db ? chunks * dim : 0, 0.0f);

  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> g(dim), xv(dim), res(has_res && need_dx ? dim : 0);
    for (int64_t c = cbegin; c < cend; ++c) {
      for (int64_t r = c * kReduceChunk; r < std::min(rows, (c + 1) * kReduceChunk); ++r) {
        gm.load(r, dim, g.data());
        xm.load(r, dim, xv.data());
        const float mu = mean_ptr[r], rs = rstd_ptr[r];
        float sum_gx = 0.0f, sum_g = 0.0f;
        for (int64_t j = 0; j < dim; ++j) {
          const float xhat = (xv[j] - mu) * rs;
          const float g_hat = g[j] * (w.empty() ? 1.0f : w[j]);
          sum_gx += g_hat * xhat;
          sum_g += g_hat;
          if (need_dw) part_w[c * dim + j] += g[j] * xhat;
          if (need_db) part_b[c * dim + j] += g[j];
          xv[j] = xhat;  // keep xhat for dx
        }
        if (need_dx) {
          const float c1 = sum_gx / static_cast<float>(dim), c2 = sum_g / static_cast<float>(dim);
          if (has_res) {  // dx = LN-backward + residual_grad in fp32, rounded once on the store
            rm.load(r, dim, res.data());
            for (int64_t j = 0; j < dim; ++j) {
              g[j] = layer_norm_add_residual(
                  layer_norm_grad_input(g[j] * (w.empty() ? 1.0f : w[j]), xv[j], c1, c2, rs), res[j]);
            }
          } else {
            for (int64_t j = 0; j < dim; ++j) {
              g[j] = layer_norm_grad_input(g[j] * (w.empty() ? 1.0f : w[j]), xv[j], c1, c2, rs);
            }
          }
          store_row(g.data(), x.scalar_type(), dim, dx_ptr + r * dx_row_bytes);
        }
      }
    }
  });

  auto finish = [&](bool need, const std::vector<float>& part) {
    if (!need) return at::empty({0}, x.options().dtype(param_dtype));
    std::vector<float> total(dim, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t j = 0; j < dim; ++j) total[j] += part[c * dim + j];
    }
    at::Tensor out = at::empty({dim}, x.options().dtype(param_dtype));
    store_row(total.data(), param_dtype, dim, out.data_ptr());
    return out;
  };
  return {dx, finish(need_dw, part_w), finish(need_db, part_b)};
}

// ---- bias + GELU -----------------------------------------------------------------------------------

at::Tensor bias_gelu_fwd(const at::Tensor& pre, const std::optional<at::Tensor>& bias, std::string_view approximate) {
  constexpr const char* op = "bias_gelu_fwd";
  check_cpu(op, pre);
  const bool tanh_form = parse_approximate(op, approximate);
  TORCH_CHECK(pre.dim() == 2, "fastvit_C::bias_gelu_fwd: pre must be (rows, H), got ", pre.sizes());
  const int64_t rows = pre.size(0), hidden = pre.size(1);
  const RowMatrix pm = row_matrix(op, "pre", pre, rows, hidden);
  const std::vector<float> b = vector_or_empty(op, "bias", bias, hidden);
  at::Tensor out = at::empty({rows, hidden}, pre.options());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = hidden * static_cast<int64_t>(out.element_size());
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hidden);
    for (int64_t r = begin; r < end; ++r) {
      pm.load(r, hidden, buf.data());
      for (int64_t j = 0; j < hidden; ++j) buf[j] = gelu_value(buf[j] + (b.empty() ? 0.0f : b[j]), tanh_form);
      store_row(buf.data(), pre.scalar_type(), hidden, out_ptr + r * row_bytes);
    }
  });
  return out;
}

at::Tensor bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                         std::string_view approximate) {
  constexpr const char* op = "bias_gelu_bwd";
  check_cpu(op, pre);
  const bool tanh_form = parse_approximate(op, approximate);
  TORCH_CHECK(pre.dim() == 2, "fastvit_C::bias_gelu_bwd: pre must be (rows, H), got ", pre.sizes());
  const int64_t rows = pre.size(0), hidden = pre.size(1);
  const RowMatrix pm = row_matrix(op, "pre", pre, rows, hidden);
  const RowMatrix gm = row_matrix(op, "grad", grad, rows, hidden);
  const std::vector<float> b = vector_or_empty(op, "bias", bias, hidden);
  at::Tensor out = at::empty({rows, hidden}, pre.options());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = hidden * static_cast<int64_t>(out.element_size());
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(hidden), g(hidden);
    for (int64_t r = begin; r < end; ++r) {
      pm.load(r, hidden, p.data());
      gm.load(r, hidden, g.data());
      for (int64_t j = 0; j < hidden; ++j) g[j] *= gelu_grad(p[j] + (b.empty() ? 0.0f : b[j]), tanh_form);
      store_row(g.data(), pre.scalar_type(), hidden, out_ptr + r * row_bytes);
    }
  });
  return out;
}

// ---- scaled residual -------------------------------------------------------------------------------

at::Tensor scaled_residual(const at::Tensor& branch, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& layer_scale, const std::optional<at::Tensor>& sample_scale,
                           int64_t rows_per_sample, at::ScalarType out_dtype) {
  constexpr const char* op = "scaled_residual";
  check_cpu(op, branch);
  check_out_dtype(op, out_dtype);
  TORCH_CHECK(branch.dim() == 2, "fastvit_C::scaled_residual: branch must be (rows, D), got ", branch.sizes());
  const int64_t rows = branch.size(0), dim = branch.size(1);
  const RowMatrix bm = row_matrix(op, "branch", branch, rows, dim);
  const bool has_res = residual.has_value() && residual->defined();
  const RowMatrix rm = has_res ? row_matrix(op, "residual", *residual, rows, dim) : RowMatrix{};
  const std::vector<float> ls = vector_or_empty(op, "layer_scale", layer_scale, dim);
  std::vector<float> ss;
  if (sample_scale.has_value() && sample_scale->defined()) {
    TORCH_CHECK(rows_per_sample >= 1 && rows % rows_per_sample == 0, "fastvit_C::scaled_residual: rows_per_sample (",
                rows_per_sample, ") must be >= 1 and divide rows (", rows, ")");
    ss = vector_or_empty(op, "sample_scale", sample_scale, rows / rows_per_sample);
  }
  at::Tensor out = at::empty({rows, dim}, branch.options().dtype(out_dtype));
  char* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = dim * static_cast<int64_t>(out.element_size());
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> bv(dim), rv(dim, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      bm.load(r, dim, bv.data());
      if (has_res) rm.load(r, dim, rv.data());
      const float s = ss.empty() ? 1.0f : ss[r / rows_per_sample];
      for (int64_t j = 0; j < dim; ++j) bv[j] = scaled_residual_value(bv[j], rv[j], ls.empty() ? 1.0f : ls[j], s);
      store_row(bv.data(), out_dtype, dim, out_ptr + r * row_bytes);
    }
  });
  return out;
}

// ---- patchify / unpatchify -------------------------------------------------------------------------

at::Tensor patchify(const at::Tensor& x, int64_t patch, at::ScalarType out_dtype) {
  constexpr const char* op = "patchify";
  check_cpu(op, x);
  check_out_dtype(op, out_dtype);
  check_block_dtype(op, "x", x);
  TORCH_CHECK(x.dim() == 4, "fastvit_C::patchify: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(patch >= 1 && x.size(2) % patch == 0 && x.size(3) % patch == 0, "fastvit_C::patchify: H and W of x ",
              x.sizes(), " must be multiples of patch = ", patch);
  const PatchGeometry g = make_patch_geometry(x.size(0), x.size(1), x.size(2), x.size(3), patch);
  const int64_t rows = g.batch * g.tokens;
  at::Tensor out = at::empty({rows, g.cols}, x.options().dtype(out_dtype));
  const auto s = x.strides();
  const std::array<int64_t, 4> st{s[0], s[1], s[2], s[3]};
  char* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = g.cols * static_cast<int64_t>(out.element_size());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = x.const_data_ptr<T>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(g.cols);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t col = 0; col < g.cols; ++col) {
          int64_t b, c, y, xx;
          patch_column_to_pixel(g, r, col, b, c, y, xx);
          buf[col] = static_cast<float>(src[b * st[0] + c * st[1] + y * st[2] + xx * st[3]]);
        }
        store_row(buf.data(), out_dtype, g.cols, out_ptr + r * row_bytes);
      }
    });
  });
  return out;
}

at::Tensor unpatchify(const at::Tensor& cols, c10::IntArrayRef image_size, int64_t patch, at::ScalarType out_dtype) {
  constexpr const char* op = "unpatchify";
  check_cpu(op, cols);
  check_out_dtype(op, out_dtype);
  TORCH_CHECK(image_size.size() == 4, "fastvit_C::unpatchify: image_size must be [B, C, H, W], got ", image_size);
  const int64_t batch = image_size[0], chans = image_size[1], height = image_size[2], width = image_size[3];
  TORCH_CHECK(patch >= 1 && height % patch == 0 && width % patch == 0, "fastvit_C::unpatchify: H and W of ",
              image_size, " must be multiples of patch = ", patch);
  const PatchGeometry g = make_patch_geometry(batch, chans, height, width, patch);
  const RowMatrix cm = row_matrix(op, "cols", cols, g.batch * g.tokens, g.cols);
  at::Tensor out = at::empty({batch, chans, height, width}, cols.options().dtype(out_dtype));
  char* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = width * static_cast<int64_t>(out.element_size());
  dispatch_float(cm.dtype, [&](auto tag) {
    using T = decltype(tag);
    // one task per image row (b, c, y): gather its W pixels from the patch matrix
    at::parallel_for(0, batch * chans * height, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(width);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = i % height, c = (i / height) % chans, b = i / (height * chans);
        for (int64_t xx = 0; xx < width; ++xx) {
          int64_t row, col;
          pixel_to_patch_column(g, b, c, y, xx, row, col);
          const T* src = reinterpret_cast<const T*>(cm.data + row * cm.row_stride_bytes);
          buf[xx] = static_cast<float>(src[col * cm.col_stride]);
        }
        store_row(buf.data(), out_dtype, width, out_ptr + i * row_bytes);
      }
    });
  });
  return out;
}

}  // namespace fastvit::cpu
