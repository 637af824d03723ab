// The K-sized pieces of ProxyAttention's fused path, around the attention
// kernels: fold (query projection with the key projection folded into the
// query rows), unfold (value and output projections) and their backwards.
//
// Each is the C++ twin of the Python function of the same name in
// icl_kernels/ops/proxy_attention_block.py, where the math is written down:
// the same ATen ops in the same order (so the same bits; tested), called from
// C++ because an ATen call from Python costs about twice the host time.  They
// are registered as CompositeImplicitAutograd: device independent, and traced
// through (decomposed into their ATen ops) by torch.compile and fake tensors.
//
// The whole block is also one C++ autograd node, `proxy_attention_block`:
// these pieces around the kernels of any backend, with no Python in its forward
// or backward for the compiled backends (cpu, cuda). The Python Function
// ProxyAttentionBlock computes the same from the same pieces (tested bitwise
// equal); it runs only where the extension is not built.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

#include <tuple>

namespace icl_kernels {

namespace {

using Opt = std::optional<at::Tensor>;

// Called under no_grad from the autograd Function: the inner ops then skip the
// autograd and view-tracking layers (about half the host time of a view).  With
// grad mode on, they are ordinary composite ops.
struct BelowAutogradWhenNoGrad {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  BelowAutogradWhenNoGrad() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
};

// t in dtype dt / as a [rows, cols] matrix, with no op at all when it already is
// (below autograd even a no-op `to` or `reshape` is a dispatched call).
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t : t.to(dt);
}

at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.is_contiguous() ? t.view({rows, cols}) : t.reshape({rows, cols});
}

// Y [B*M, C] holds every head's block for each row -> [B*K, C]: each row's own
// head block (own_head in the Python twin): a diagonal view and one copy.
at::Tensor own_head(const at::Tensor& Y, int64_t B, int64_t K, int64_t H, bool official) {
  const int64_t C = Y.size(1), d = C / H;
  if (official) return Y.view({B, H, K, H, d}).diagonal(0, 1, 3).permute({0, 3, 1, 2}).reshape({B * K, C});
  return Y.view({B, K, H, H, d}).diagonal(0, 2, 3).permute({0, 1, 3, 2}).reshape({B * K, C});
}

at::Tensor addmm_or_mm(const Opt& bias, const at::Tensor& a, const at::Tensor& b) {
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold(
    const at::Tensor& q, const at::Tensor& Wq, const Opt& bq, const at::Tensor& Wkv, const Opt& bkv,
    const Opt& gamma, const Opt& beta, const at::Tensor& mask, double scale, at::ScalarType x_dtype) {
  BelowAutogradWhenNoGrad below;
  RECORD_FUNCTION("icl_kernels::fold", std::vector<c10::IValue>());  // a profiler scope (free when off)
  const int64_t B = q.size(0), K = q.size(1), C = q.size(2);
  const int64_t M = mask.size(0), H = mask.size(1);
  const auto dt = Wq.scalar_type();
  at::Tensor q2 = as_dtype(as_matrix(q, B * K, C), dt);
  at::Tensor Wk = Wkv.slice(0, 0, C);
  Opt bk;
  if (bkv.has_value()) bk = bkv->slice(0, 0, C);
  at::Tensor Qe = (addmm_or_mm(bq, q2, Wq.t()).view({B, M, 1, C / H}) * mask).view({B * M, C});
  at::Tensor Wk_f = gamma.has_value() ? Wk * (*gamma * scale) : Wk * scale;
  at::Tensor v;
  if (!beta.has_value()) {
    v = bk.has_value() ? *bk * scale : Wk.new_zeros({C});
  } else {
    v = bk.has_value() ? at::addmv(*bk, Wk, *beta, scale, scale) : at::mv(Wk, *beta).mul_(scale);
  }
  at::Tensor A = as_dtype(at::mm(Qe, Wk_f).view({B, M, C}), x_dtype);
  at::Tensor c = as_dtype(at::mv(Qe, v).view({B, M}), x_dtype);
  return {q2, Qe, Wk_f, v, A, c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unfold(
    const at::Tensor& Z, const at::Tensor& Wkv, const Opt& bkv, const Opt& gamma, const Opt& beta,
    const at::Tensor& Wp, const Opt& bp, const at::Tensor& mask, bool official) {
  BelowAutogradWhenNoGrad below;
  RECORD_FUNCTION("icl_kernels::unfold", std::vector<c10::IValue>());  // a profiler scope (free when off)
  const int64_t B = Z.size(0), M = Z.size(1), C = Z.size(2);
  const int64_t H = mask.size(1), K = M / H;
  at::Tensor Zc = as_dtype(as_matrix(Z, B * M, C), Wkv.scalar_type());
  at::Tensor Zt;
  if (!gamma.has_value()) {
    Zt = beta.has_value() ? Zc + *beta : Zc;
  } else {
    Zt = beta.has_value() ? at::addcmul(*beta, Zc, *gamma) : Zc * *gamma;
  }
  Opt bv;
  if (bkv.has_value()) bv = bkv->slice(0, C, 2 * C);
  at::Tensor O = own_head(addmm_or_mm(bv, Zt, Wkv.slice(0, C, 2 * C).t()), B, K, H, official);
  at::Tensor out = addmm_or_mm(bp, O, Wp.t()).view({B, K, C});
  return {Zc, Zt, O, out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
unfold_backward(const at::Tensor& d_out, const at::Tensor& Zc, const at::Tensor& Zt, const at::Tensor& O,
                const at::Tensor& Wkv, const Opt& gamma, const at::Tensor& Wp, const at::Tensor& mask,
                at::ScalarType x_dtype) {
  BelowAutogradWhenNoGrad below;
  RECORD_FUNCTION("icl_kernels::unfold_backward", std::vector<c10::IValue>());  // a profiler scope (free when off)
  const int64_t BK = O.size(0), C = O.size(1), BM = Zc.size(0), B = d_out.size(0);
  const int64_t M = mask.size(0), H = mask.size(1);
  at::Tensor g = as_dtype(as_matrix(d_out, BK, C), Wkv.scalar_type());
  at::Tensor dWp = at::mm(g.t(), O);
  at::Tensor dbp = g.sum(0);
  at::Tensor dY = (at::mm(g, Wp).view({B, M, 1, C / H}) * mask).view({BM, C});
  at::Tensor dZt = at::mm(dY, Wkv.slice(0, C, 2 * C));
  at::Tensor dWv = at::mm(dY.t(), Zt);
  at::Tensor dbv = dY.sum(0);
  at::Tensor dbeta = dZt.sum(0);
  at::Tensor dgamma, dZ;
  if (!gamma.has_value()) {
    dgamma = Zc.new_empty({0});
    dZ = dZt;
  } else {
    dgamma = (dZt * Zc).sum(0);
    dZ = dZt * *gamma;
  }
  return {as_dtype(dZ.view({B, M, C}), x_dtype), dWp, dbp, dWv, dbv, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fold_backward(const at::Tensor& dA_in, const at::Tensor& dc_in, const at::Tensor& q2, const at::Tensor& Qe,
              const at::Tensor& Wq, const at::Tensor& Wkv, const at::Tensor& Wk_f, const at::Tensor& v,
              const Opt& gamma, const Opt& beta, const at::Tensor& mask, bool official, double scale, const Opt& dWv,
              const Opt& dbv, const Opt& dgamma_in, const Opt& dbeta_in) {
  BelowAutogradWhenNoGrad below;
  RECORD_FUNCTION("icl_kernels::fold_backward", std::vector<c10::IValue>());  // a profiler scope (free when off)
  const int64_t B = dA_in.size(0), M = dA_in.size(1), C = dA_in.size(2);
  const int64_t H = mask.size(1);
  const auto dt = Wq.scalar_type();
  at::Tensor dA = as_dtype(as_matrix(dA_in, B * M, C), dt);
  at::Tensor dc = as_dtype(dc_in.is_contiguous() ? dc_in.view({B * M}) : dc_in.reshape({B * M}), dt);
  at::Tensor Wk = Wkv.slice(0, 0, C);
  at::Tensor dWk_f = at::mm(Qe.t(), dA);
  at::Tensor dv = at::mv(Qe.t(), dc);
  at::Tensor dgamma, dWk, dbeta;
  if (!gamma.has_value()) {
    dgamma = Wk.new_empty({0});
    dWk = dWk_f * scale;
  } else {
    at::Tensor dsg = (dWk_f * Wk).sum(0);
    dgamma = dgamma_in.has_value() ? dgamma_in->add(dsg, scale) : dsg.mul_(scale);
    dWk = dWk_f * (*gamma * scale);
  }
  if (!beta.has_value()) {
    dbeta = Wk.new_empty({0});
  } else {
    dWk.addr_(dv, *beta, 1, scale);
    dbeta = dbeta_in.has_value() ? at::addmv(*dbeta_in, Wk.t(), dv, 1, scale) : at::mv(Wk.t(), dv).mul_(scale);
  }
  at::Tensor dQe = at::mm(dA, Wk_f.t()).addr_(dc, v);
  at::Tensor dQ = own_head(dQe, B, M / H, H, official);
  at::Tensor dWq = at::mm(dQ.t(), q2);
  at::Tensor dbq = dQ.sum(0);
  at::Tensor dq = at::mm(dQ, Wq).view({B, M / H, C});
  at::Tensor dWkv = at::cat({dWk, dWv.has_value() ? *dWv : at::zeros_like(dWk)});
  at::Tensor dbk = dv * scale;
  at::Tensor dbkv = at::cat({dbk, dbv.has_value() ? *dbv : at::zeros_like(dbk)});
  return {dq, dWq, dbq, dWkv, dbkv, dgamma, dbeta};
}

// -- the whole block as one C++ autograd node (compiled backends) ----------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels: the raw compiled ops of the cpu / cuda backends (the dispatcher
// picks the device's), or, when a backend name is given (triton, torch), the
// registered op icl_kernels::proxy_attention_forward / _backward, which calls
// that backend's Python kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_forward(const at::Tensor& x, const at::Tensor& A,
                                                              const at::Tensor& c, std::optional<double> eps,
                                                              c10::string_view backend) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             std::optional<double>);
  using NamedSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<double>, c10::string_view);
  if (backend.empty()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("icl_kernels::_proxy_attention_forward", "")
                         .typed<Sig>();
    return op.call(x, A, c, eps);
  }
  static auto named = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("icl_kernels::proxy_attention_forward", "")
                          .typed<NamedSig>();
  return named.call(x, A, c, eps, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(const Opt& dZ, const Opt& dS, const at::Tensor& x,
                                                               const at::Tensor& A, const at::Tensor& c,
                                                               const at::Tensor& Z, const at::Tensor& lse,
                                                               std::optional<double> eps, c10::string_view backend) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const Opt&, const Opt&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, std::optional<double>);
  using NamedSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const Opt&, const Opt&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, std::optional<double>, c10::string_view);
  if (backend.empty()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("icl_kernels::_proxy_attention_backward", "")
                         .typed<Sig>();
    return op.call(dZ, dS, x, A, c, Z, lse, eps);
  }
  static auto named = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("icl_kernels::proxy_attention_backward", "")
                          .typed<NamedSig>();
  return named.call(dZ, dS, x, A, c, Z, lse, eps, backend);
}

Opt defined_or_none(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

// The block's forward: (out, attn, saved...) with autocast off (the K-sized
// products in the parameters' dtype, the kernels in x's).
struct BlockForward {
  at::Tensor out, attn, q2, Qe, Wk_f, v, A, c, Z, lse, Zc, Zt, O;
};

BlockForward block_forward(const at::Tensor& q, const at::Tensor& x, const at::Tensor& Wq, const Opt& bq,
                           const at::Tensor& Wkv, const Opt& bkv, const Opt& gamma, const Opt& beta,
                           const at::Tensor& Wp, const Opt& bp, const at::Tensor& mask, bool official, double scale,
                           std::optional<double> eps, c10::string_view backend) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  BlockForward f;
  std::tie(f.q2, f.Qe, f.Wk_f, f.v, f.A, f.c) = fold(q, Wq, bq, Wkv, bkv, gamma, beta, mask, scale, x.scalar_type());
  at::Tensor S;
  std::tie(f.Z, S, f.lse) = kernel_forward(x, f.A, f.c, eps, backend);
  std::tie(f.Zc, f.Zt, f.O, f.out) = unfold(f.Z, Wkv, bkv, gamma, beta, Wp, bp, mask, official);
  const int64_t B = q.size(0), K = q.size(1), H = mask.size(1), N = x.size(1);
  f.attn = official ? S.view({B, H, K, N}).permute({0, 2, 1, 3}) : S.view({B, K, H, N});
  return f;
}

class BlockFunction : public torch::autograd::Function<BlockFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& x, const at::Tensor& Wq,
                               const Opt& bq, const at::Tensor& Wkv, const Opt& bkv, const Opt& gamma,
                               const Opt& beta, const at::Tensor& Wp, const Opt& bp, const at::Tensor& mask,
                               bool official, double scale, std::optional<double> eps, c10::string_view backend) {
    BlockForward f = block_forward(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, mask, official, scale, eps, backend);
    ctx->save_for_backward({f.q2, x, Wq, Wkv, Wp, gamma.value_or(at::Tensor()), beta.value_or(at::Tensor()), mask,
                            f.Qe, f.Wk_f, f.v, f.A, f.c, f.Z, f.lse, f.Zc, f.Zt, f.O});
    ctx->saved_data["official"] = official;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps.has_value() ? c10::IValue(*eps) : c10::IValue();
    ctx->saved_data["backend"] = std::string(backend);
    ctx->saved_data["bias"] = static_cast<int64_t>(bq.has_value()) | (static_cast<int64_t>(bkv.has_value()) << 1) |
                              (static_cast<int64_t>(bp.has_value()) << 2);
    ctx->set_materialize_grads(false);
    return {f.out, f.attn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& d_out = grads[0];
    const at::Tensor& d_attn = grads[1];
    variable_list result(15);
    if (!d_out.defined() && !d_attn.defined()) return result;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q2 = saved[0], &x = saved[1], &Wq = saved[2], &Wkv = saved[3], &Wp = saved[4];
    const Opt gamma = defined_or_none(saved[5]), beta = defined_or_none(saved[6]);
    const at::Tensor &mask = saved[7], &Qe = saved[8], &Wk_f = saved[9], &v = saved[10], &A = saved[11],
                     &c = saved[12], &Z = saved[13], &lse = saved[14], &Zc = saved[15], &Zt = saved[16],
                     &O = saved[17];
    const bool official = ctx->saved_data["official"].toBool();
    const double scale = ctx->saved_data["scale"].toDouble();
    const c10::IValue eps_v = ctx->saved_data["eps"];
    const std::optional<double> eps = eps_v.isNone() ? std::nullopt : std::optional<double>(eps_v.toDouble());
    const int64_t bias = ctx->saved_data["bias"].toInt();
    Opt dZ, dWv, dbv, dgamma, dbeta;
    at::Tensor dWp, dbp;
    if (d_out.defined()) {
      at::Tensor dZ_t, dWv_t, dbv_t, dgamma_t, dbeta_t;
      std::tie(dZ_t, dWp, dbp, dWv_t, dbv_t, dgamma_t, dbeta_t) =
          unfold_backward(d_out, Zc, Zt, O, Wkv, gamma, Wp, mask, x.scalar_type());
      dZ = dZ_t;
      dWv = dWv_t;
      dbv = dbv_t;
      if (gamma.has_value()) dgamma = dgamma_t;
      dbeta = dbeta_t;
    }
    Opt dS;
    if (d_attn.defined()) {
      const int64_t B = A.size(0), M = A.size(1), N = x.size(1);
      dS = as_dtype((official ? d_attn.permute({0, 2, 1, 3}) : d_attn).reshape({B, M, N}), x.scalar_type());
    }
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    auto [dx, dA, dc] = kernel_backward(dZ, dS, x, A, c, Z, lse, eps, backend);
    if (!(x.is_contiguous() && dx.strides() == x.strides())) {  // dx in x's layout
      at::Tensor want = at::empty_like(x);
      if (want.strides() != dx.strides()) dx = want.copy_(dx);
    }
    auto [dq, dWq, dbq, dWkv, dbkv, dgamma_o, dbeta_o] = fold_backward(
        dA, dc, q2, Qe, Wq, Wkv, Wk_f, v, gamma, beta, mask, official, scale, dWv, dbv, dgamma, dbeta);
    result[0] = dq;
    result[1] = dx;
    result[2] = dWq;
    if (bias & 1) result[3] = dbq;
    result[4] = dWkv;
    if (bias & 2) result[5] = dbkv;
    if (gamma.has_value()) result[6] = dgamma_o;
    if (beta.has_value()) result[7] = dbeta_o;
    result[8] = dWp;
    if (bias & 4) result[9] = dbp;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> block_autograd(const at::Tensor& q, const at::Tensor& x, const at::Tensor& Wq,
                                                  const Opt& bq, const at::Tensor& Wkv, const Opt& bkv,
                                                  const Opt& gamma, const Opt& beta, const at::Tensor& Wp,
                                                  const Opt& bp, const at::Tensor& mask, bool official,
                                                  double scale, std::optional<double> eps, c10::string_view backend) {
  auto outs = BlockFunction::apply(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, mask, official, scale, eps, backend);
  return {outs[0], outs[1]};
}

// Below autograd (inference mode): the forward alone.
std::tuple<at::Tensor, at::Tensor> block_no_autograd(const at::Tensor& q, const at::Tensor& x, const at::Tensor& Wq,
                                                     const Opt& bq, const at::Tensor& Wkv, const Opt& bkv,
                                                     const Opt& gamma, const Opt& beta, const at::Tensor& Wp,
                                                     const Opt& bp, const at::Tensor& mask, bool official,
                                                     double scale, std::optional<double> eps,
                                                     c10::string_view backend) {
  BlockForward f = block_forward(q, x, Wq, bq, Wkv, bkv, gamma, beta, Wp, bp, mask, official, scale, eps, backend);
  return {f.out, f.attn};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(icl_kernels, m) {
  m.def("_proxy_block_fold(Tensor q, Tensor Wq, Tensor? bq, Tensor Wkv, Tensor? bkv, Tensor? gamma, "
        "Tensor? beta, Tensor mask, float scale, ScalarType x_dtype) "
        "-> (Tensor q2, Tensor Qe, Tensor Wk_f, Tensor v, Tensor A, Tensor c)");
  m.def("_proxy_block_unfold(Tensor Z, Tensor Wkv, Tensor? bkv, Tensor? gamma, Tensor? beta, Tensor Wp, "
        "Tensor? bp, Tensor mask, bool official) -> (Tensor Zc, Tensor Zt, Tensor O, Tensor out)");
  m.def("_proxy_block_unfold_backward(Tensor d_out, Tensor Zc, Tensor Zt, Tensor O, Tensor Wkv, "
        "Tensor? gamma, Tensor Wp, Tensor mask, ScalarType x_dtype) -> (Tensor dZ, Tensor dWp, "
        "Tensor dbp, Tensor dWv, Tensor dbv, Tensor dgamma, Tensor dbeta)");
  m.def("_proxy_block_fold_backward(Tensor dA, Tensor dc, Tensor q2, Tensor Qe, Tensor Wq, Tensor Wkv, "
        "Tensor Wk_f, Tensor v, Tensor? gamma, Tensor? beta, Tensor mask, bool official, float scale, "
        "Tensor? dWv, "
        "Tensor? dbv, Tensor? dgamma, Tensor? dbeta) -> (Tensor dq, Tensor dWq, Tensor dbq, "
        "Tensor dWkv, Tensor dbkv, Tensor dgamma_out, Tensor dbeta_out)");
}

TORCH_LIBRARY_FRAGMENT(icl_kernels, m) {
  // ProxyAttention's fused path: (out [B, K, C], attn [B, K, H, N]); see the Python
  // ProxyAttentionBlock for the math. mask [M, H, 1] is the head_mask of the layout;
  // backend "" runs the compiled kernels of the tensors' device, a name (triton,
  // torch) that backend's kernels through the registered ops.
  m.def("proxy_attention_block(Tensor q, Tensor x, Tensor Wq, Tensor? bq, Tensor Wkv, Tensor? bkv, "
        "Tensor? gamma, Tensor? beta, Tensor Wp, Tensor? bp, Tensor mask, bool official, float scale, "
        "float? eps, str backend) -> (Tensor out, Tensor attn)");
}

TORCH_LIBRARY_IMPL(icl_kernels, Autograd, m) {
  m.impl("proxy_attention_block", &block_autograd);
}

TORCH_LIBRARY_IMPL(icl_kernels, CompositeExplicitAutograd, m) {
  m.impl("proxy_attention_block", &block_no_autograd);
}

TORCH_LIBRARY_IMPL(icl_kernels, CompositeImplicitAutograd, m) {
  m.impl("_proxy_block_fold", &fold);
  m.impl("_proxy_block_unfold", &unfold);
  m.impl("_proxy_block_unfold_backward", &unfold_backward);
  m.impl("_proxy_block_fold_backward", &fold_backward);
}

}  // namespace icl_kernels
