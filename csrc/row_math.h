// Per-element and per-row math of the fastvit_C ops, shared by the CUDA kernels (*_kernels.cu) and the
// CPU loops (cpu_loops.cpp) so that CI, which has no GPU, tests the same formulas the kernels run.
//
// Only <cmath>/<cstdint>: no torch headers (a .cu including them compiles ~50x slower).
// Every function is FASTVIT_HOST_DEVICE: `__host__ __device__ inline` under nvcc, `inline` otherwise.
// All math in float32; callers convert fp16/bf16 on load and store.
//
// GELU follows PyTorch's formulas (aten/src/ATen/native/cpu/Activation.cpp, cuda/ActivationGeluKernel.cu):
//   erf:  y = 0.5 x (1 + erf(x / sqrt 2)),           y' = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
//   tanh: u = sqrt(2 / pi) (x + 0.044715 x^3), y = 0.5 x (1 + tanh u),
//         y' = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
//
// LayerNorm over a row of D values (fp32 statistics):
//   mean = sum(x) / D, var = sum((x - mean)^2) / D (biased), rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) rstd, y = xhat * weight + bias
//   backward with g_hat = grad_y * weight, c1 = mean_j(g_hat * xhat), c2 = mean_j(g_hat):
//   dx = rstd (g_hat - xhat c1 - c2) (+ residual_grad), dweight = sum_rows(grad_y * xhat), dbias = sum_rows(grad_y)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTVIT_HOST_DEVICE __host__ __device__ inline
#else
#define FASTVIT_HOST_DEVICE inline
#endif

namespace fastvit {

constexpr float kSqrt1_2 = 0.70710678118654752440f;        // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;     // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;    // sqrt(2 / pi)
constexpr float kGeluTanhKappa = 0.044715f;

// ---- GELU ---------------------------------------------------------------------------------------

FASTVIT_HOST_DEVICE float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * kSqrt1_2)); }

FASTVIT_HOST_DEVICE float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
  const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

FASTVIT_HOST_DEVICE float gelu_tanh(float x) {
  const float inner = kSqrt2OverPi * (x + kGeluTanhKappa * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

FASTVIT_HOST_DEVICE float gelu_tanh_grad(float x) {
  const float x_sq = x * x;
  const float inner = kSqrt2OverPi * (x + kGeluTanhKappa * x_sq * x);
  const float t = tanhf(inner);
  const float left = 0.5f * x;
  const float right = 1.0f + t;
  const float left_derivative = 0.5f * right;
  const float right_derivative = 1.0f - t * t;
  const float inner_derivative = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhKappa * x_sq);
  return left_derivative + left * right_derivative * inner_derivative;
}

FASTVIT_HOST_DEVICE float gelu_value(float x, bool tanh_form) { return tanh_form ? gelu_tanh(x) : gelu_erf(x); }

FASTVIT_HOST_DEVICE float gelu_grad(float x, bool tanh_form) {
  return tanh_form ? gelu_tanh_grad(x) : gelu_erf_grad(x);
}

// ---- LayerNorm ----------------------------------------------------------------------------------

// Welford running statistics: fold values one at a time (welford_update) or merge partial states
// from different threads (welford_combine, Chan et al.). m2 = sum of squared deviations from mean.
struct WelfordState {
  float mean;
  float m2;
  float count;
};

FASTVIT_HOST_DEVICE WelfordState welford_init() { return WelfordState{0.0f, 0.0f, 0.0f}; }

FASTVIT_HOST_DEVICE void welford_update(WelfordState& s, float x) {
  s.count += 1.0f;
  const float delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
}

FASTVIT_HOST_DEVICE WelfordState welford_combine(const WelfordState& a, const WelfordState& b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float nb_over_n = b.count / count;
  const float delta = b.mean - a.mean;
  return WelfordState{a.mean + delta * nb_over_n, a.m2 + b.m2 + delta * delta * a.count * nb_over_n, count};
}

// 1 / sqrt(var + eps) for the biased variance var = m2 / D (as torch.nn.functional.layer_norm).
FASTVIT_HOST_DEVICE float layer_norm_rstd(float var, float eps) { return 1.0f / sqrtf(fmaxf(var, 0.0f) + eps); }

FASTVIT_HOST_DEVICE float layer_norm_apply(float x, float mean, float rstd, float weight, float bias) {
  return (x - mean) * rstd * weight + bias;
}

// dx of one element; g_hat = grad_y * weight, xhat = (x - mean) * rstd,
// c1 = mean over the row of g_hat * xhat, c2 = mean over the row of g_hat.
FASTVIT_HOST_DEVICE float layer_norm_grad_input(float g_hat, float xhat, float c1, float c2, float rstd) {
  return rstd * (g_hat - xhat * c1 - c2);
}

// dx of one element (layer_norm_grad_input) plus a residual gradient, added in fp32 before the caller's
// single rounding: the skip connection of a pre-norm block, out = x + f(LN(x)), gives dx = LN-backward +
// grad_out. A separate step so the kernels can finish the LN term before loading the residual.
FASTVIT_HOST_DEVICE float layer_norm_add_residual(float grad_input, float residual_grad) {
  return grad_input + residual_grad;
}

// ---- scaled residual ----------------------------------------------------------------------------

// residual + sample_scale * layer_scale * branch (pass 0 / 1 / 1 for a term that is absent).
FASTVIT_HOST_DEVICE float scaled_residual_value(float branch, float residual, float layer_scale, float sample_scale) {
  return residual + sample_scale * layer_scale * branch;
}

// ---- patchify index maps ------------------------------------------------------------------------

// Images (batch, channels, height, width) cut into patch x patch tiles. The patch matrix has
// batch * tokens rows (row = b * tokens + py * grid_w + px) and cols = channels * patch * patch
// columns (col = c * patch * patch + ky * patch + kx, the Conv2d weight's (D, C, p, p) flattened).
struct PatchGeometry {
  int64_t batch, channels, height, width, patch, grid_w, tokens /* per image */, cols /* C * p * p */;
};

FASTVIT_HOST_DEVICE PatchGeometry make_patch_geometry(int64_t batch, int64_t channels, int64_t height, int64_t width,
                                                      int64_t patch) {
  const int64_t grid_w = width / patch;
  return PatchGeometry{batch, channels, height, width, patch, grid_w, (height / patch) * grid_w,
                       channels * patch * patch};
}

// (row, col) of the patch matrix -> (b, c, y, x) of the image.
FASTVIT_HOST_DEVICE void patch_column_to_pixel(const PatchGeometry& g, int64_t row, int64_t col, int64_t& b,
                                               int64_t& c, int64_t& y, int64_t& x) {
  b = row / g.tokens;
  const int64_t n = row - b * g.tokens;
  const int64_t py = n / g.grid_w;
  const int64_t px = n - py * g.grid_w;
  const int64_t pp = g.patch * g.patch;
  c = col / pp;
  const int64_t k = col - c * pp;
  const int64_t ky = k / g.patch;
  const int64_t kx = k - ky * g.patch;
  y = py * g.patch + ky;
  x = px * g.patch + kx;
}

// (b, c, y, x) of the image -> (row, col) of the patch matrix (the inverse map).
FASTVIT_HOST_DEVICE void pixel_to_patch_column(const PatchGeometry& g, int64_t b, int64_t c, int64_t y, int64_t x,
                                               int64_t& row, int64_t& col) {
  const int64_t py = y / g.patch, ky = y - py * g.patch;
  const int64_t px = x / g.patch, kx = x - px * g.patch;
  row = b * g.tokens + py * g.grid_w + px;
  col = (c * g.patch + ky) * g.patch + kx;
}

}  // namespace fastvit
