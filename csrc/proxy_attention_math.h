// Scalar math of the fused proxy attention, shared by the CPU and CUDA
// kernels so that the CPU tests exercise the same arithmetic the GPU runs.
//
// Notation (see README "The math"): for one batch element, M query rows A[m]
// of width C with bias c[m], N tokens x[n] of width C.
//   xhat[n] = (x[n] - mean) * rstd   (or x[n] itself when no eps is given)
//   S[m, n] = A[m] . xhat[n] + c[m]
//   P = softmax over n of S,  Z[m] = sum_n P[m, n] xhat[n],  lse[m] = log sum_n exp S
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ICL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ICL_HOST_DEVICE inline
#endif

namespace icl_kernels {

// Running state of a softmax over a stream of logits: the largest logit seen
// and the sum of exp(logit - max).  Empty state: max = -inf, sum = 0.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
ICL_HOST_DEVICE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// exp(a - b) that is 0 when a is -inf (an empty partial state), also when b is -inf.
template <typename acc_t>
ICL_HOST_DEVICE acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == neg_infinity<acc_t>() ? acc_t(0) : std::exp(old_max - new_max);
}

// Merge two partial softmax states; returns the merged state and, through
// scale_a / scale_b, the factors that rescale quantities accumulated under
// each input state (the partial Z rows) to the merged one.
template <typename acc_t>
ICL_HOST_DEVICE SoftmaxState<acc_t> merge_softmax_states(
    SoftmaxState<acc_t> a, SoftmaxState<acc_t> b, acc_t* scale_a, acc_t* scale_b) {
  const acc_t m = a.max > b.max ? a.max : b.max;
  const acc_t fa = rescale_factor(a.max, m);
  const acc_t fb = rescale_factor(b.max, m);
  *scale_a = fa;
  *scale_b = fb;
  return SoftmaxState<acc_t>{m, a.sum * fa + b.sum * fb};
}

template <typename acc_t>
ICL_HOST_DEVICE acc_t log_sum_exp(SoftmaxState<acc_t> s) {
  return s.max + std::log(s.sum);
}

// Reciprocal standard deviation of a token from its mean and the sum of squared
// deviations (two-pass statistics keep cancellation out of the variance).
template <typename acc_t>
ICL_HOST_DEVICE acc_t token_rstd(acc_t sum_sq_dev, int64_t C, acc_t eps) {
  const acc_t var = sum_sq_dev / acc_t(C);
  return acc_t(1) / std::sqrt(var + eps);
}

// dS = dS_out + P * (dP - D): the softmax backward for one logit, where
// dP = dZ[m] . xhat[n] and D = dZ[m] . Z[m].
template <typename acc_t>
ICL_HOST_DEVICE acc_t logit_grad(acc_t grad_s_out, acc_t p, acc_t dp, acc_t d) {
  return grad_s_out + p * (dp - d);
}

// LayerNorm backward (no affine) for one channel of one token:
// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
template <typename acc_t>
ICL_HOST_DEVICE acc_t layer_norm_input_grad(
    acc_t dxhat, acc_t xhat, acc_t rstd, acc_t mean_dxhat, acc_t mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace icl_kernels
