// Schema of the raw prototype update kernels and their shared argument checks.
//
// The raw ops compute per-class sums [K, C] and totals [K] in one pass over the
// features (and their backward); the division, the optional all-reduce and the
// in-place momentum blend are [K, C]-sized and live in Python
// (icl_kernels/ops/prototype_update.py), which calls these for the `cpu` and
// `cuda` backends.
#include "prototype_update.h"

#include <torch/library.h>

namespace icl_kernels {

namespace {

void check_device(const at::Tensor& t, const char* name, const at::Tensor& features) {
  TORCH_CHECK_VALUE(t.device() == features.device(), "prototype_update: ", name, " is on ",
                    t.device(), " but features is on ", features.device(),
                    "; all tensors must be on one device");
}

void check_acc_dtype(const at::Tensor& t, const char* name, const at::Tensor& features) {
  const auto want = prototype_acc_dtype(features.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "prototype_update: ", name, " must have dtype ", want,
                   " (the accumulation dtype of ", features.scalar_type(), " features), got ",
                   t.scalar_type());
}

void check_features(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 3, "prototype_update: features must be [B, C, N], got ",
                    features.dim(), " dims ", features.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()),
                   "prototype_update: features must be a floating tensor, got ",
                   features.scalar_type());
}

}  // namespace

void check_prototype_labels_inputs(const at::Tensor& features, const at::Tensor& labels,
                                   const std::optional<at::Tensor>& weights, int64_t num_classes) {
  check_features(features);
  TORCH_CHECK_VALUE(num_classes >= 1, "prototype_update: num_classes must be >= 1, got ",
                    num_classes);
  check_device(labels, "labels", features);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "prototype_update: labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == features.size(0) &&
                        labels.size(1) == features.size(2),
                    "prototype_update: labels must be [B, N] = [", features.size(0), ", ",
                    features.size(2), "], got ", labels.sizes());
  if (weights.has_value()) {
    check_device(*weights, "weights", features);
    check_acc_dtype(*weights, "weights", features);
    TORCH_CHECK_VALUE(weights->sizes() == labels.sizes(), "prototype_update: weights must be [B, N] = ",
                      labels.sizes(), ", got ", weights->sizes());
  }
}

void check_prototype_probs_inputs(const at::Tensor& features, const at::Tensor& probs) {
  check_features(features);
  check_device(probs, "probs", features);
  TORCH_CHECK_TYPE(probs.scalar_type() == features.scalar_type(), "prototype_update: probs has dtype ",
                   probs.scalar_type(), " but features has ", features.scalar_type(),
                   "; they must match");
  TORCH_CHECK_VALUE(probs.dim() == 3 && probs.size(0) == features.size(0) &&
                        probs.size(2) == features.size(2) && probs.size(1) >= 1,
                    "prototype_update: probs must be [B, K, N] with B = ", features.size(0),
                    ", K >= 1, N = ", features.size(2), ", got ", probs.sizes());
}

void check_prototype_grads(const at::Tensor& grad_sums, const at::Tensor& grad_totals,
                           const at::Tensor& features, int64_t num_classes) {
  check_device(grad_sums, "grad_sums", features);
  check_device(grad_totals, "grad_totals", features);
  check_acc_dtype(grad_sums, "grad_sums", features);
  check_acc_dtype(grad_totals, "grad_totals", features);
  TORCH_CHECK_VALUE(grad_sums.dim() == 2 && grad_sums.size(0) == num_classes &&
                        grad_sums.size(1) == features.size(1),
                    "prototype_update backward: grad_sums must be [K, C] = [", num_classes, ", ",
                    features.size(1), "], got ", grad_sums.sizes());
  TORCH_CHECK_VALUE(grad_totals.dim() == 1 && grad_totals.size(0) == num_classes,
                    "prototype_update backward: grad_totals must be [K] = [", num_classes,
                    "], got ", grad_totals.sizes());
}

void throw_invalid_label(int64_t label, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "prototype_update: labels must be in [0, ", num_classes,
                    ") or equal ignore_index=", ignore_index, "; found the label ", label);
  abort();  // unreachable
}

void throw_invalid_label_unknown(int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "prototype_update: labels must be in [0, ", num_classes,
                    ") or equal ignore_index=", ignore_index,
                    "; found at least one label outside that range");
  abort();  // unreachable
}

TORCH_LIBRARY_FRAGMENT(icl_kernels, m) {
  // A label counts when 0 <= label < num_classes and label != ignore_index (and its weight is
  // not 0).  Other labels raise a ValueError on CPU always, on CUDA when check_labels (one
  // device-to-host sync); unchecked, they are skipped.  sums [K, C], totals [K].
  m.def("_prototype_update_labels_forward(Tensor features, Tensor labels, Tensor? weights, "
        "int num_classes, int ignore_index, bool check_labels, bool deterministic) "
        "-> (Tensor sums, Tensor totals)");
  // grad_features [B, C, N] (features' dtype and layout) and grad_weights [B, N]; a gradient
  // that is not asked for comes back as an empty tensor of shape [0].
  m.def("_prototype_update_labels_backward(Tensor grad_sums, Tensor grad_totals, "
        "Tensor features, Tensor labels, Tensor? weights, int ignore_index, "
        "bool need_features_grad, bool need_weights_grad) "
        "-> (Tensor grad_features, Tensor grad_weights)");
  m.def("_prototype_update_probs_forward(Tensor features, Tensor probs, bool deterministic) "
        "-> (Tensor sums, Tensor totals)");
  m.def("_prototype_update_probs_backward(Tensor grad_sums, Tensor grad_totals, "
        "Tensor features, Tensor probs, bool need_features_grad, bool need_probs_grad) "
        "-> (Tensor grad_features, Tensor grad_probs)");
}

}  // namespace icl_kernels
