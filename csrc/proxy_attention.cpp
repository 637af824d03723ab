// Schema of the raw proxy attention kernels and their shared argument checks.
//
// The raw ops are the per-device kernels (CPU here, CUDA in csrc/cuda/).  The
// user-facing op, its autograd and the backend choice live in Python
// (icl_kernels/ops/proxy_attention.py), which calls these for the `cpu` and
// `cuda` backends.
#include "proxy_attention.h"

#include <torch/library.h>

namespace icl_kernels {

namespace {

void check_same_device_and_dtype(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "proxy_attention: ", name, " is on ", t.device(),
                    " but x is on ", x.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "proxy_attention: ", name, " has dtype ",
                   t.scalar_type(), " but x has dtype ", x.scalar_type(),
                   "; A, c and the gradients must have x's dtype");
}

}  // namespace

void check_proxy_attention_inputs(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, std::optional<double> eps) {
  TORCH_CHECK_VALUE(x.dim() == 3, "proxy_attention: x must be [B, N, C], got ", x.dim(), " dims ",
                    x.sizes());
  TORCH_CHECK_VALUE(A.dim() == 3, "proxy_attention: A must be [B, M, C], got ", A.dim(), " dims ",
                    A.sizes());
  TORCH_CHECK_VALUE(c.dim() == 2, "proxy_attention: c must be [B, M], got ", c.dim(), " dims ",
                    c.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "proxy_attention: x must be a floating tensor, got ", x.scalar_type());
  check_same_device_and_dtype(A, "A", x);
  check_same_device_and_dtype(c, "c", x);
  TORCH_CHECK_VALUE(A.size(0) == x.size(0), "proxy_attention: A has batch ", A.size(0),
                    " but x has batch ", x.size(0));
  TORCH_CHECK_VALUE(A.size(2) == x.size(2), "proxy_attention: A has width C=", A.size(2),
                    " but x has C=", x.size(2));
  TORCH_CHECK_VALUE(c.size(0) == A.size(0) && c.size(1) == A.size(1),
                    "proxy_attention: c must be [B, M] = [", A.size(0), ", ", A.size(1),
                    "], got ", c.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, "proxy_attention: x must hold at least one token (N >= 1)");
  TORCH_CHECK_VALUE(x.size(2) >= 1, "proxy_attention: x must have C >= 1 channels");
  if (eps.has_value()) {
    TORCH_CHECK_VALUE(*eps > 0.0 && std::isfinite(*eps),
                      "proxy_attention: eps must be a finite number > 0 or None, got ", *eps);
  }
}

void check_proxy_attention_backward_inputs(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, const at::Tensor& Z,
    const at::Tensor& lse, std::optional<double> eps) {
  check_proxy_attention_inputs(x, A, c, eps);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A.size(1);
  check_same_device_and_dtype(Z, "Z", x);
  TORCH_CHECK_VALUE(Z.dim() == 3 && Z.size(0) == B && Z.size(1) == M && Z.size(2) == C,
                    "proxy_attention backward: Z must be [B, M, C], got ", Z.sizes());
  TORCH_CHECK_VALUE(lse.device() == x.device() && lse.scalar_type() == lse_dtype(x.scalar_type()) &&
                        lse.dim() == 2 && lse.size(0) == B && lse.size(1) == M,
                    "proxy_attention backward: lse must be [B, M] on x's device, float64 for "
                    "float64 x and float32 otherwise");
  if (grad_Z.has_value()) {
    check_same_device_and_dtype(*grad_Z, "grad_Z", x);
    TORCH_CHECK_VALUE(grad_Z->sizes() == Z.sizes(),
                      "proxy_attention backward: grad_Z must be [B, M, C], got ", grad_Z->sizes());
  }
  if (grad_S.has_value()) {
    check_same_device_and_dtype(*grad_S, "grad_S", x);
    TORCH_CHECK_VALUE(grad_S->dim() == 3 && grad_S->size(0) == B && grad_S->size(1) == M &&
                          grad_S->size(2) == N,
                      "proxy_attention backward: grad_S must be [B, M, N], got ", grad_S->sizes());
  }
}

TORCH_LIBRARY_FRAGMENT(icl_kernels, m) {
  // Z [B, M, C] and S [B, M, N] in x's dtype, lse [B, M] float32 (float64 for float64 x).
  m.def("_proxy_attention_forward(Tensor x, Tensor A, Tensor c, float? eps) "
        "-> (Tensor Z, Tensor S, Tensor lse)");
  // Gradients with respect to x, A and c; a missing grad_Z / grad_S counts as zero.
  m.def("_proxy_attention_backward(Tensor? grad_Z, Tensor? grad_S, Tensor x, Tensor A, "
        "Tensor c, Tensor Z, Tensor lse, float? eps) -> (Tensor grad_x, Tensor grad_A, "
        "Tensor grad_c)");
}

}  // namespace icl_kernels
