// Shared declarations of the proxy attention op: argument checks used by every
// device backend, so that a direct call of the raw op fails the same way on
// CPU and CUDA (ValueError / TypeError naming the argument).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace icl_kernels {

// dtype of the saved log-sum-exp: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType lse_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks x [B, N, C], A [B, M, C], c [B, M] and eps; returns nothing, throws
// c10::ValueError / c10::TypeError with the argument's name otherwise.
void check_proxy_attention_inputs(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c,
    std::optional<double> eps);

// Checks the extra backward arguments against the forward ones.
void check_proxy_attention_backward_inputs(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c,
    const at::Tensor& Z, const at::Tensor& lse, std::optional<double> eps);

}  // namespace icl_kernels
