// Small helpers for CPU kernels whose inner loops must vectorise: explicit
// SIMD vectors, an exp written with plain arithmetic (std::exp is a scalar
// libm call), a register-blocked product, and function multiversioning.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Compile hot functions for AVX-512, AVX2+FMA and the baseline, picked at load
// time by the CPU (GCC's ifunc-based target_clones). Wheels stay portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define ICL_CPU_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ICL_CPU_MULTIVERSION
#endif

// One work item of a CPU kernel, `void name(const Args& a, int64_t b, int64_t s)`,
// compiled for every ISA of ICL_CPU_MULTIVERSION around the inlined `name##_impl`.
#define ICL_CPU_WORK_ITEM(name, ...) \
  ICL_CPU_MULTIVERSION void name(const __VA_ARGS__& a, int64_t b, int64_t s) { name##_impl(a, b, s); }

#if defined(__GNUC__)
#define ICL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ICL_ALWAYS_INLINE inline
#endif

namespace icl_kernels {
namespace cpu {

// 32-byte SIMD vectors through GCC/Clang vector extensions: the compiler maps
// them to one AVX register, two SSE registers, or one half of an AVX-512 one,
// whatever the function is compiled for (see ICL_CPU_MULTIVERSION).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t int_type __attribute__((vector_size(32)));
  static constexpr int64_t width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int64_t width = 4;
};

template <typename V, typename T>
ICL_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
ICL_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Sum of the lanes of a vector (pairwise: the lanes are independent chains).
template <typename V>
ICL_ALWAYS_INLINE auto hsum(const V& v) -> decltype(v[0] + v[0]) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  decltype(v[0] + v[0]) lanes[n];
  std::memcpy(lanes, &v, sizeof(V));
  for (int w = n / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

template <typename V>
ICL_ALWAYS_INLINE V vmax(const V& a, const V& b) {
  return a > b ? a : b;
}

// exp(x) of a vector of floats by range reduction x = k ln2 + r, |r| <= ln2/2,
// and a degree-6 polynomial for exp(r) (Cephes coefficients): about 2 ulp on
// the clamped range. Inputs below about -87.3 give a tiny positive value
// instead of 0: harmless for softmax weights, its only use here.
ICL_ALWAYS_INLINE Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using VI = Vec<float>::int_type;
  x = vmax(x, V{} - 87.3365478515625f);
  x = x < 88.3762626647949f ? x : V{} + 88.3762626647949f;
  const V fx = x * 1.44269504088896341f + 0.5f;
  V k = __builtin_convertvector(__builtin_convertvector(fx, VI), V);  // truncation
  k = k > fx ? k - 1.0f : k;                                          // ... made a floor
  V r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Double precision keeps libm: float64 is the accuracy path, not the fast one.
ICL_ALWAYS_INLINE Vec<double>::type vexp(Vec<double>::type x) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

// out[i, l] (+)= sum_j coef[i * si + j * sj] * rows[j * ldr + l] for a block
// of IB output rows and LB vectors of columns: IB * LB accumulators stay in
// registers while j runs, each step loading LB vectors and IB scalars.
template <typename acc_t, int IB, int LB>
ICL_ALWAYS_INLINE void gemm_block(int64_t J, const acc_t* coef, int64_t si, int64_t sj,
                                  const acc_t* rows, int64_t ldr, acc_t* out, int64_t ldo,
                                  bool accumulate) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  V acc[IB][LB];
  for (int i = 0; i < IB; ++i)
    for (int l = 0; l < LB; ++l) acc[i][l] = accumulate ? vload<V>(out + i * ldo + l * W) : V{};
  for (int64_t j = 0; j < J; ++j) {
    V r[LB];
    for (int l = 0; l < LB; ++l) r[l] = vload<V>(rows + j * ldr + l * W);
    for (int i = 0; i < IB; ++i) {
      const acc_t cf = coef[i * si + j * sj];
      for (int l = 0; l < LB; ++l) acc[i][l] += cf * r[l];
    }
  }
  for (int i = 0; i < IB; ++i)
    for (int l = 0; l < LB; ++l) vstore(out + i * ldo + l * W, acc[i][l]);
}

template <typename acc_t, int LB>
ICL_ALWAYS_INLINE void gemm_column_block(int64_t I, int64_t J, const acc_t* coef, int64_t si,
                                         int64_t sj, const acc_t* rows, int64_t ldr, acc_t* out,
                                         int64_t ldo, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= I; i += 4)
    gemm_block<acc_t, 4, LB>(J, coef + i * si, si, sj, rows, ldr, out + i * ldo, ldo, accumulate);
  switch (I - i) {
    case 3: gemm_block<acc_t, 3, LB>(J, coef + i * si, si, sj, rows, ldr, out + i * ldo, ldo, accumulate); break;
    case 2: gemm_block<acc_t, 2, LB>(J, coef + i * si, si, sj, rows, ldr, out + i * ldo, ldo, accumulate); break;
    case 1: gemm_block<acc_t, 1, LB>(J, coef + i * si, si, sj, rows, ldr, out + i * ldo, ldo, accumulate); break;
    default: break;
  }
}

// The one matrix product of the CPU kernels (L must be a multiple of the
// vector width; callers pad): out[I, L] (+)= coef[I, J] @ rows[J, L], with
// coef addressed through strides so that either operand layout works.
template <typename acc_t>
ICL_ALWAYS_INLINE void gemm_rows(int64_t I, int64_t J, int64_t L, const acc_t* coef, int64_t si,
                                 int64_t sj, const acc_t* rows, int64_t ldr, acc_t* out,
                                 int64_t ldo, bool accumulate) {
  constexpr int64_t W = Vec<acc_t>::width;
  int64_t l = 0;
  for (; l + 2 * W <= L; l += 2 * W)
    gemm_column_block<acc_t, 2>(I, J, coef, si, sj, rows + l, ldr, out + l, ldo, accumulate);
  if (l < L) gemm_column_block<acc_t, 1>(I, J, coef, si, sj, rows + l, ldr, out + l, ldo, accumulate);
}

// Transpose of an 8x8 block of floats: d[j * dld + i] = s[i * sld + j].
// Eight vector loads, 24 shuffles and eight vector stores instead of 64
// scalar loads and stores.  Needs __builtin_shufflevector (clang, GCC >= 12).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ICL_HAVE_TRANSPOSE8 1
ICL_ALWAYS_INLINE void transpose8x8(const float* s, int64_t sld, float* d, int64_t dld) {
  using V = Vec<float>::type;
  V r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = vload<V>(s + k * sld);
  for (int k = 0; k < 8; k += 2) {  // interleave row pairs
    t[k] = __builtin_shufflevector(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[k + 1] = __builtin_shufflevector(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 8; k += 4) {  // then pairs of pairs
    u[k] = __builtin_shufflevector(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 1] = __builtin_shufflevector(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[k + 2] = __builtin_shufflevector(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[k + 3] = __builtin_shufflevector(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int k = 0; k < 4; ++k) {  // and the 128-bit halves: column k and column k + 4
    vstore(d + k * dld, __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(d + (k + 4) * dld, __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}
#else
#define ICL_HAVE_TRANSPOSE8 0
#endif

ICL_ALWAYS_INLINE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace cpu
}  // namespace icl_kernels
