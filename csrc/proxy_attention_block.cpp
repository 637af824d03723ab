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
// The autograd node is the Python Function that calls them under no_grad.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
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

at::Tensor addmm_or_mm(const Opt& bias, const at::Tensor& a, const at::Tensor& b) {
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold(
    const at::Tensor& q, const at::Tensor& Wq, const Opt& bq, const at::Tensor& Wkv, const Opt& bkv,
    const Opt& gamma, const Opt& beta, const at::Tensor& mask, double scale, at::ScalarType x_dtype) {
  BelowAutogradWhenNoGrad below;
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
    const at::Tensor& Wp, const Opt& bp, const at::Tensor& mask) {
  BelowAutogradWhenNoGrad below;
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
  at::Tensor O = (addmm_or_mm(bv, Zt, Wkv.slice(0, C, 2 * C).t()).view({B, M, H, C / H}) * mask)
                     .sum(2)
                     .view({B * K, C});
  at::Tensor out = addmm_or_mm(bp, O, Wp.t()).view({B, K, C});
  return {Zc, Zt, O, out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
unfold_backward(const at::Tensor& d_out, const at::Tensor& Zc, const at::Tensor& Zt, const at::Tensor& O,
                const at::Tensor& Wkv, const Opt& gamma, const at::Tensor& Wp, const at::Tensor& mask,
                at::ScalarType x_dtype) {
  BelowAutogradWhenNoGrad below;
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
              const Opt& gamma, const Opt& beta, const at::Tensor& mask, double scale, const Opt& dWv,
              const Opt& dbv, const Opt& dgamma_in, const Opt& dbeta_in) {
  BelowAutogradWhenNoGrad below;
  const int64_t B = dA_in.size(0), M = dA_in.size(1), C = dA_in.size(2);
  const int64_t H = mask.size(1), BK = q2.size(0);
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
  at::Tensor dQ = (dQe.view({B, M, H, C / H}) * mask).sum(2).view({BK, C});
  at::Tensor dWq = at::mm(dQ.t(), q2);
  at::Tensor dbq = dQ.sum(0);
  at::Tensor dq = at::mm(dQ, Wq).view({B, M / H, C});
  at::Tensor dWkv = at::cat({dWk, dWv.has_value() ? *dWv : at::zeros_like(dWk)});
  at::Tensor dbk = dv * scale;
  at::Tensor dbkv = at::cat({dbk, dbv.has_value() ? *dbv : at::zeros_like(dbk)});
  return {dq, dWq, dbq, dWkv, dbkv, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(icl_kernels, m) {
  m.def("_proxy_block_fold(Tensor q, Tensor Wq, Tensor? bq, Tensor Wkv, Tensor? bkv, Tensor? gamma, "
        "Tensor? beta, Tensor mask, float scale, ScalarType x_dtype) "
        "-> (Tensor q2, Tensor Qe, Tensor Wk_f, Tensor v, Tensor A, Tensor c)");
  m.def("_proxy_block_unfold(Tensor Z, Tensor Wkv, Tensor? bkv, Tensor? gamma, Tensor? beta, Tensor Wp, "
        "Tensor? bp, Tensor mask) -> (Tensor Zc, Tensor Zt, Tensor O, Tensor out)");
  m.def("_proxy_block_unfold_backward(Tensor d_out, Tensor Zc, Tensor Zt, Tensor O, Tensor Wkv, "
        "Tensor? gamma, Tensor Wp, Tensor mask, ScalarType x_dtype) -> (Tensor dZ, Tensor dWp, "
        "Tensor dbp, Tensor dWv, Tensor dbv, Tensor dgamma, Tensor dbeta)");
  m.def("_proxy_block_fold_backward(Tensor dA, Tensor dc, Tensor q2, Tensor Qe, Tensor Wq, Tensor Wkv, "
        "Tensor Wk_f, Tensor v, Tensor? gamma, Tensor? beta, Tensor mask, float scale, Tensor? dWv, "
        "Tensor? dbv, Tensor? dgamma, Tensor? dbeta) -> (Tensor dq, Tensor dWq, Tensor dbq, "
        "Tensor dWkv, Tensor dbkv, Tensor dgamma_out, Tensor dbeta_out)");
}

TORCH_LIBRARY_IMPL(icl_kernels, CompositeImplicitAutograd, m) {
  m.impl("_proxy_block_fold", &fold);
  m.impl("_proxy_block_unfold", &unfold);
  m.impl("_proxy_block_unfold_backward", &unfold_backward);
  m.impl("_proxy_block_fold_backward", &fold_backward);
}

}  // namespace icl_kernels
