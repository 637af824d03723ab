// Shared declarations of the prototype update kernels (per-class sums and
// totals, forward and backward): argument checks used by every device backend
// so that a direct call of a raw op fails the same way on CPU and CUDA.
//
// Raw ops (see prototype_update.cpp for the schema):
//   labels form: sums[k] = sum over (b, n) with labels[b, n] == k of w[b, n] * features[b, :, n]
//                totals[k] = sum of the same w[b, n] (w = 1 without weights)
//   probs form:  sums[k] = sum_{b, n} probs[b, k, n] * features[b, :, n], totals[k] = sum probs
// features are [B, C, N] with any strides; sums [K, C] and totals [K] are in the
// accumulation dtype (float64 for float64 features, float32 otherwise).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>

namespace icl_kernels {

inline at::ScalarType prototype_acc_dtype(at::ScalarType features_dtype) {
  return features_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Sentinel of the CPU kernels' "first invalid label" slots.
constexpr int64_t kNoInvalidLabel = std::numeric_limits<int64_t>::min();

void check_prototype_labels_inputs(const at::Tensor& features, const at::Tensor& labels,
                                   const std::optional<at::Tensor>& weights, int64_t num_classes);

void check_prototype_probs_inputs(const at::Tensor& features, const at::Tensor& probs);

// grad_sums [K, C] and grad_totals [K] in the accumulation dtype, on features' device.
void check_prototype_grads(const at::Tensor& grad_sums, const at::Tensor& grad_totals,
                           const at::Tensor& features, int64_t num_classes);

// The error raised for a label outside [0, K) that is not ignore_index.
[[noreturn]] void throw_invalid_label(int64_t label, int64_t num_classes, int64_t ignore_index);
[[noreturn]] void throw_invalid_label_unknown(int64_t num_classes, int64_t ignore_index);

}  // namespace icl_kernels
