// fastvit_C: the op schemas (csrc/README.md), their CPU implementations (cpu_loops.cpp) and the four
// composites, written once for both devices.
//
// A composite is vendor GEMMs around the block ops: the GEMMs go through ATen (at::addmm with a 1-D bias,
// which cuBLASLt fuses in its epilogue on CUDA; at::_addmm_activation for cuBLASLt's GELU epilogue, which
// is the tanh form and so serves approximate="tanh" inference on CUDA only), and the blocks through the
// dispatcher, so CUDA tensors reach the CUDA kernels (ops_cuda.cpp) and CPU tensors the CPU loops.
//
// The C++ signatures of the block kernels are those of fastvit::cpu below; ops_cuda.cpp must register
// its kernels with the same types (the dispatcher refuses a second, different C++ signature at load).
#include <ATen/core/Tensor.h>  // lean includes, not <ATen/ATen.h>: this file is on CI's compile-time path
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fastvit::cpu {  // cpu_loops.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              at::ScalarType out_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              std::array<bool, 3> output_mask,
                                                              const std::optional<at::Tensor>& residual_grad);
at::Tensor bias_gelu_fwd(const at::Tensor& pre, const std::optional<at::Tensor>& bias, std::string_view approximate);
at::Tensor bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                         std::string_view approximate);
at::Tensor scaled_residual(const at::Tensor& branch, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& layer_scale, const std::optional<at::Tensor>& sample_scale,
                           int64_t rows_per_sample, at::ScalarType out_dtype);
at::Tensor patchify(const at::Tensor& x, int64_t patch, at::ScalarType out_dtype);
at::Tensor unpatchify(const at::Tensor& cols, c10::IntArrayRef image_size, int64_t patch, at::ScalarType out_dtype);
}  // namespace fastvit::cpu

namespace fastvit {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The block ops through the dispatcher (typed with the CPU kernels' signatures; looked up once).
template <typename Sig>
c10::TypedOperatorHandle<Sig> block_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const OptTensor& weight,
                                                              const OptTensor& bias, double eps,
                                                              at::ScalarType out_dtype) {
  static const auto op = block_op<decltype(cpu::layer_norm_fwd)>("fastvit_C::layer_norm_fwd");
  return op.call(x, weight, bias, eps, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const OptTensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, std::array<bool, 3> mask,
                                                              const OptTensor& residual_grad) {
  static const auto op = block_op<decltype(cpu::layer_norm_bwd)>("fastvit_C::layer_norm_bwd");
  return op.call(grad_y, x, weight, mean, rstd, mask, residual_grad);
}

at::Tensor bias_gelu_fwd(const at::Tensor& pre, const OptTensor& bias, std::string_view approximate) {
  static const auto op = block_op<decltype(cpu::bias_gelu_fwd)>("fastvit_C::bias_gelu_fwd");
  return op.call(pre, bias, approximate);
}

at::Tensor bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& pre, const OptTensor& bias,
                         std::string_view approximate) {
  static const auto op = block_op<decltype(cpu::bias_gelu_bwd)>("fastvit_C::bias_gelu_bwd");
  return op.call(grad, pre, bias, approximate);
}

at::Tensor scaled_residual(const at::Tensor& branch, const OptTensor& residual, const OptTensor& layer_scale,
                           const OptTensor& sample_scale, int64_t rows_per_sample, at::ScalarType out_dtype) {
  static const auto op = block_op<decltype(cpu::scaled_residual)>("fastvit_C::scaled_residual");
  return op.call(branch, residual, layer_scale, sample_scale, rows_per_sample, out_dtype);
}

at::Tensor patchify(const at::Tensor& x, int64_t patch, at::ScalarType out_dtype) {
  static const auto op = block_op<decltype(cpu::patchify)>("fastvit_C::patchify");
  return op.call(x, patch, out_dtype);
}

at::Tensor unpatchify(const at::Tensor& cols, c10::IntArrayRef image_size, int64_t patch, at::ScalarType out_dtype) {
  static const auto op = block_op<decltype(cpu::unpatchify)>("fastvit_C::unpatchify");
  return op.call(cols, image_size, patch, out_dtype);
}

// ---- helpers ---------------------------------------------------------------------------------------

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// An empty (0,) tensor: the "not computed / not kept" placeholder of the schemas.
at::Tensor empty0(const at::Tensor& like, at::ScalarType dtype) { return at::empty({0}, like.options().dtype(dtype)); }

// y = a @ w^T (+ bias): nn.Linear's GEMM; a 1-D bias goes to cuBLASLt's epilogue on CUDA.
at::Tensor gemm_linear(const at::Tensor& a, const at::Tensor& w, const OptTensor& bias) {
  return given(bias) ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

void check_gemm_operand(const char* op, const char* name, const OptTensor& t, at::ScalarType gemm_dtype,
                        c10::IntArrayRef shape) {
  if (!given(t)) return;
  TORCH_CHECK(t->sizes() == shape, "fastvit_C::", op, ": ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == gemm_dtype, "fastvit_C::", op, ": ", name, " must be in the GEMM dtype ", gemm_dtype,
              " (fc1_weight's / weight's), got ", t->scalar_type());
}

// Sum of t (rows, D) over rows in float32 (the fp32 accumulation of a bias gradient).
at::Tensor sum_rows_fp32(const at::Tensor& t) { return at::sum(t, {0}, false, at::kFloat); }

// ---- LayerNorm + MLP -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_mlp_fwd(
    const at::Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias, const at::Tensor& fc1_weight,
    const OptTensor& fc1_bias, const at::Tensor& fc2_weight, const OptTensor& fc2_bias, const OptTensor& layer_scale,
    const OptTensor& sample_scale, double eps, std::string_view approximate, bool residual, at::ScalarType out_dtype,
    bool save_for_backward) {
  constexpr const char* op = "layernorm_mlp_fwd";
  TORCH_CHECK(x.dim() == 3, "fastvit_C::layernorm_mlp_fwd: x must be (B, N, D), got ", x.sizes());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2), rows = batch * tokens;
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == dim, "fastvit_C::layernorm_mlp_fwd: fc1_weight must be",
              " (hidden, ", dim, "), got ", fc1_weight.sizes());
  const int64_t hidden = fc1_weight.size(0);
  const at::ScalarType gemm = fc1_weight.scalar_type();
  check_gemm_operand(op, "fc2_weight", fc2_weight, gemm, {dim, hidden});
  check_gemm_operand(op, "fc1_bias", fc1_bias, gemm, {hidden});
  check_gemm_operand(op, "fc2_bias", fc2_bias, gemm, {dim});
  const bool tanh_form = approximate == "tanh";
  const bool scaled = given(layer_scale) || given(sample_scale);

  const at::Tensor x2 = x.reshape({rows, dim});  // a view for any (B, N, D) strides that merge
  auto [xn, mean, rstd] = layer_norm_fwd(x2, norm_weight, norm_bias, eps, gemm);
  at::Tensor preact, act;
  if (!save_for_backward && tanh_form && given(fc1_bias) && x.is_cuda()) {
    // cuBLASLt's GELU epilogue (the tanh form). Not on CPU: there _addmm_activation applies the erf form.
    act = at::_addmm_activation(*fc1_bias, xn, fc1_weight.t(), 1, 1, /*use_gelu=*/true);
    preact = empty0(x, gemm);
  } else {
    preact = gemm_linear(xn, fc1_weight, fc1_bias);
    act = bias_gelu_fwd(preact, std::nullopt, approximate);
    if (!save_for_backward) preact = empty0(x, gemm);
  }
  xn.reset();
  at::Tensor branch = gemm_linear(act, fc2_weight, fc2_bias);  // (rows, D) in the GEMM dtype
  act.reset();
  at::Tensor y;
  if (!scaled && !residual && out_dtype == gemm) {
    y = branch;
  } else {
    y = scaled_residual(branch, residual ? OptTensor(x2) : std::nullopt, layer_scale, sample_scale,
                        std::max<int64_t>(tokens, 1), out_dtype);
  }
  if (!(save_for_backward && scaled)) branch = empty0(x, gemm);
  return {y.view({batch, tokens, dim}), preact, mean, rstd, branch};
}

std::vector<at::Tensor> layernorm_mlp_bwd(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& norm_weight,
                                          const OptTensor& norm_bias, const at::Tensor& fc1_weight,
                                          const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                                          const OptTensor& fc2_bias, const OptTensor& layer_scale,
                                          const OptTensor& sample_scale, const at::Tensor& preact,
                                          const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& branch,
                                          double eps, std::string_view approximate, bool residual,
                                          c10::List<bool> needs) {
  constexpr const char* op = "layernorm_mlp_bwd";
  TORCH_CHECK(needs.size() == 9, "fastvit_C::layernorm_mlp_bwd: needs must have 9 entries, got ", needs.size());
  TORCH_CHECK(x.dim() == 3 && grad_out.sizes() == x.sizes(), "fastvit_C::layernorm_mlp_bwd: x and grad_out must be ",
              "(B, N, D) of one shape, got ", x.sizes(), " and ", grad_out.sizes());
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2), rows = batch * tokens;
  const int64_t hidden = fc1_weight.size(0);
  const at::ScalarType gemm = fc1_weight.scalar_type();
  check_gemm_operand(op, "fc2_weight", fc2_weight, gemm, {dim, hidden});
  TORCH_CHECK(preact.sizes() == c10::IntArrayRef({rows, hidden}) && preact.scalar_type() == gemm,
              "fastvit_C::layernorm_mlp_bwd: preact must be (", rows, ", ", hidden, ") ", gemm,
              " (saved by layernorm_mlp_fwd with save_for_backward), got ", preact.sizes(), " ", preact.scalar_type());

  const OptTensor inputs[9] = {x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                               sample_scale};
  bool need[9];
  for (int i = 0; i < 9; ++i) need[i] = needs.get(i) && given(inputs[i]);
  std::vector<at::Tensor> grads(9);
  for (int i = 0; i < 9; ++i) grads[i] = empty0(x, given(inputs[i]) ? inputs[i]->scalar_type() : x.scalar_type());

  const at::Tensor g2 = grad_out.reshape({rows, dim});  // row stride 0 stays a view
  const int64_t per_sample = std::max<int64_t>(tokens, 1);
  if (need[7] || need[8]) {
    TORCH_CHECK(branch.sizes() == c10::IntArrayRef({rows, dim}), "fastvit_C::layernorm_mlp_bwd: the gradient of ",
                "layer_scale / sample_scale needs branch (", rows, ", ", dim, ") saved by layernorm_mlp_fwd, got ",
                branch.sizes());
    const at::Tensor g32 = g2.to(at::kFloat);
    if (need[7]) {  // sum over rows of grad_out * sample_scale * branch
      const at::Tensor t = scaled_residual(branch, std::nullopt, std::nullopt, sample_scale, per_sample, at::kFloat);
      grads[7] = at::sum(at::mul(g32, t), {0}).to(layer_scale->scalar_type());
    }
    if (need[8]) {  // per-sample sums of grad_out * layer_scale * branch
      const at::Tensor t = scaled_residual(branch, std::nullopt, layer_scale, std::nullopt, per_sample, at::kFloat);
      grads[8] = at::sum((at::mul(g32, t)).view({batch, tokens * dim}), {1}).to(sample_scale->scalar_type());
    }
  }
  bool need_mlp = false;
  for (int i = 0; i < 7; ++i) need_mlp = need_mlp || need[i];
  if (!need_mlp) return grads;

  // gz = grad_out * sample_scale * layer_scale, in fp32 math, rounded to the GEMM dtype
  const bool scaled = given(layer_scale) || given(sample_scale);
  const at::Tensor gz = scaled || g2.scalar_type() != gemm
                            ? scaled_residual(g2, std::nullopt, layer_scale, sample_scale, per_sample, gemm)
                            : g2;
  at::Tensor act = bias_gelu_fwd(preact, std::nullopt, approximate);
  if (need[5]) grads[5] = at::mm(gz.t(), act);  // (D, hidden)
  if (need[6]) grads[6] = sum_rows_fp32(gz).to(fc2_bias->scalar_type());
  act.reset();
  if (!(need[0] || need[1] || need[2] || need[3] || need[4])) return grads;

  const at::Tensor dpre = bias_gelu_bwd(at::mm(gz, fc2_weight), preact, std::nullopt, approximate);  // (rows, hidden)
  const at::Tensor x2 = x.reshape({rows, dim});
  if (need[3]) {
    // xn = LN(x) in the GEMM dtype, by the forward's block (one kernel on CUDA): it recomputes the
    // forward's statistics bit for bit (deterministic, same x and eps) and writes xn once, as the forward did
    const at::Tensor xn = std::get<0>(layer_norm_fwd(x2, norm_weight, norm_bias, eps, gemm));
    grads[3] = at::mm(dpre.t(), xn);  // (hidden, D)
  }
  if (need[4]) grads[4] = sum_rows_fp32(dpre).to(fc1_bias->scalar_type());
  if (need[0] || need[1] || need[2]) {
    const at::Tensor dxn = at::mm(dpre, fc1_weight);  // (rows, D)
    // the skip connection's gradient (grad_out) is added inside the block, in fp32 before dx's rounding
    auto [dx, dnw, dnb] = layer_norm_bwd(dxn, x2, norm_weight, mean, rstd, {need[0], need[1], need[2]},
                                         residual && need[0] ? OptTensor(g2) : std::nullopt);
    if (need[0]) grads[0] = dx.view(x.sizes());
    if (need[1]) grads[1] = dnw.to(norm_weight->scalar_type());
    if (need[2]) grads[2] = dnb.to(norm_bias->scalar_type());
  }
  return grads;
}

// ---- patch embedding -------------------------------------------------------------------------------

struct PatchShape {
  int64_t batch, chans, height, width, dim, patch, tokens, cols;
};

PatchShape patch_shape(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "fastvit_C::", op, ": x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3) &&
                  weight.size(2) >= 1,
              "fastvit_C::", op, ": weight must be (D, C=", x.size(1), ", p, p), got ", weight.sizes());
  const int64_t p = weight.size(2);
  TORCH_CHECK(x.size(2) % p == 0 && x.size(3) % p == 0, "fastvit_C::", op, ": H and W of x ", x.sizes(),
              " must be multiples of the patch size ", p);
  return PatchShape{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), p,
                    (x.size(2) / p) * (x.size(3) / p), x.size(1) * p * p};
}

at::Tensor patch_embed_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                           const OptTensor& pos_embed, const OptTensor& prefix_tokens) {
  constexpr const char* op = "patch_embed_fwd";
  const PatchShape s = patch_shape(op, x, weight);
  const at::ScalarType gemm = weight.scalar_type();
  check_gemm_operand(op, "bias", bias, gemm, {s.dim});
  const int64_t num_prefix = given(prefix_tokens) ? prefix_tokens->size(1) : 0;
  if (given(prefix_tokens)) {
    TORCH_CHECK(prefix_tokens->dim() == 3 && prefix_tokens->size(0) == 1 && prefix_tokens->size(2) == s.dim,
                "fastvit_C::patch_embed_fwd: prefix_tokens must be (1, P, ", s.dim, "), got ", prefix_tokens->sizes());
  }
  const int64_t total = num_prefix + s.tokens;
  if (given(pos_embed)) {
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(2) == s.dim &&
                    (pos_embed->size(1) == total || pos_embed->size(1) == s.tokens),
                "fastvit_C::patch_embed_fwd: pos_embed must be (1, ", total, " or ", s.tokens, ", ", s.dim, "), got ",
                pos_embed->sizes());
  }
  const at::ScalarType out_dtype =
      given(pos_embed) ? pos_embed->scalar_type() : (given(prefix_tokens) ? prefix_tokens->scalar_type() : gemm);

  const at::Tensor a = patchify(x, s.patch, gemm);                          // (B*N, C*p*p)
  const at::Tensor tokens = gemm_linear(a, weight.reshape({s.dim, s.cols}), bias)  // (B*N, D)
                                .view({s.batch, s.tokens, s.dim});
  if (num_prefix == 0 && !given(pos_embed) && out_dtype == gemm) return tokens;
  at::Tensor out = at::empty({s.batch, total, s.dim}, x.options().dtype(out_dtype));
  at::Tensor patches = out.narrow(1, num_prefix, s.tokens);
  const bool pos_all = given(pos_embed) && pos_embed->size(1) == total && num_prefix > 0;
  if (given(pos_embed)) {
    at::add_out(patches, tokens, pos_all ? pos_embed->narrow(1, num_prefix, s.tokens) : *pos_embed);
  } else {
    patches.copy_(tokens);
  }
  if (num_prefix > 0) {
    at::Tensor head = out.narrow(1, 0, num_prefix);
    const at::Tensor prefix = prefix_tokens->expand({s.batch, num_prefix, s.dim});
    if (pos_all) {
      at::add_out(head, prefix, pos_embed->narrow(1, 0, num_prefix));
    } else {
      head.copy_(prefix);
    }
  }
  return out;
}

std::vector<at::Tensor> patch_embed_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        int64_t num_prefix, int64_t pos_embed_len, std::array<bool, 5> needs) {
  constexpr const char* op = "patch_embed_bwd";
  const PatchShape s = patch_shape(op, x, weight);
  const int64_t total = num_prefix + s.tokens;
  TORCH_CHECK(num_prefix >= 0 && grad.dim() == 3 && grad.size(0) == s.batch && grad.size(1) == total &&
                  grad.size(2) == s.dim,
              "fastvit_C::patch_embed_bwd: grad must be (", s.batch, ", ", total, ", ", s.dim, "), got ", grad.sizes());
  TORCH_CHECK(!needs[3] || pos_embed_len == total || pos_embed_len == s.tokens, "fastvit_C::patch_embed_bwd: ",
              "pos_embed_len must be ", total, " or ", s.tokens, ", got ", pos_embed_len);
  const at::ScalarType gemm = weight.scalar_type();
  std::vector<at::Tensor> grads = {empty0(x, x.scalar_type()), empty0(x, gemm), empty0(x, at::kFloat),
                                   empty0(x, at::kFloat), empty0(x, at::kFloat)};
  const at::Tensor dy3 = grad.narrow(1, num_prefix, s.tokens);  // (B, N, D): the patch tokens
  if (needs[0] || needs[1]) {
    const at::Tensor dy = dy3.reshape({s.batch * s.tokens, s.dim}).to(gemm);
    if (needs[1]) grads[1] = at::mm(dy.t(), patchify(x, s.patch, gemm)).view(weight.sizes());
    if (needs[0]) {
      grads[0] = unpatchify(at::mm(dy, weight.reshape({s.dim, s.cols})), {s.batch, s.chans, s.height, s.width},
                            s.patch, x.scalar_type());
    }
  }
  if (needs[2]) grads[2] = at::sum(dy3, at::IntArrayRef{0, 1}, false, at::kFloat);
  if (needs[3]) grads[3] = at::sum(pos_embed_len == total ? grad : dy3, {0}, true, at::kFloat);
  if (needs[4]) grads[4] = at::sum(grad.narrow(1, 0, num_prefix), {0}, true, at::kFloat);
  return grads;
}

}  // namespace
}  // namespace fastvit

TORCH_LIBRARY(fastvit_C, m) {
  m.set_python_module("fastvit.ops._extension_fakes");  // where the fake (meta) implementations live
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype)"
        " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool[3] output_mask,"
        " Tensor? residual_grad=None) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("bias_gelu_fwd(Tensor pre, Tensor? bias, str approximate) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad, Tensor pre, Tensor? bias, str approximate) -> Tensor");
  m.def("scaled_residual(Tensor branch, Tensor? residual, Tensor? layer_scale, Tensor? sample_scale,"
        " int rows_per_sample, ScalarType out_dtype) -> Tensor");
  m.def("patchify(Tensor x, int patch, ScalarType out_dtype) -> Tensor");
  m.def("unpatchify(Tensor cols, int[4] image_size, int patch, ScalarType out_dtype) -> Tensor");
  m.def("layernorm_mlp_fwd(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor fc1_weight, Tensor? fc1_bias,"
        " Tensor fc2_weight, Tensor? fc2_bias, Tensor? layer_scale, Tensor? sample_scale, float eps, str approximate,"
        " bool residual, ScalarType out_dtype, bool save_for_backward)"
        " -> (Tensor y, Tensor preact, Tensor mean, Tensor rstd, Tensor branch)");
  m.def("layernorm_mlp_bwd(Tensor grad_out, Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor fc1_weight,"
        " Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? layer_scale, Tensor? sample_scale,"
        " Tensor preact, Tensor mean, Tensor rstd, Tensor branch, float eps, str approximate, bool residual,"
        " bool[] needs) -> Tensor[]");
  m.def("patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens) -> Tensor");
  m.def("patch_embed_bwd(Tensor grad, Tensor x, Tensor weight, int num_prefix, int pos_embed_len, bool[5] needs)"
        " -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastvit_C, CPU, m) {
  m.impl("layer_norm_fwd", &fastvit::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastvit::cpu::layer_norm_bwd);
  m.impl("bias_gelu_fwd", &fastvit::cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &fastvit::cpu::bias_gelu_bwd);
  m.impl("scaled_residual", &fastvit::cpu::scaled_residual);
  m.impl("patchify", &fastvit::cpu::patchify);
  m.impl("unpatchify", &fastvit::cpu::unpatchify);
  m.impl("layernorm_mlp_fwd", &fastvit::layernorm_mlp_fwd);
  m.impl("layernorm_mlp_bwd", &fastvit::layernorm_mlp_bwd);
  m.impl("patch_embed_fwd", &fastvit::patch_embed_fwd);
  m.impl("patch_embed_bwd", &fastvit::patch_embed_bwd);
}

#ifdef FASTVIT_WITH_CUDA
// The composites on CUDA tensors: the same code; its blocks reach the kernels of ops_cuda.cpp.
TORCH_LIBRARY_IMPL(fastvit_C, CUDA, m) {
  m.impl("layernorm_mlp_fwd", &fastvit::layernorm_mlp_fwd);
  m.impl("layernorm_mlp_bwd", &fastvit::layernorm_mlp_bwd);
  m.impl("patch_embed_fwd", &fastvit::patch_embed_fwd);
  m.impl("patch_embed_bwd", &fastvit::patch_embed_bwd);
}
#endif
