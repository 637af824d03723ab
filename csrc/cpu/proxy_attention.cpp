// CPU kernels of the fused proxy attention (forward and backward).
//
// Work is split into (batch, token range) items with a partition that depends
// only on the shapes, never on the thread count, and partial results are
// combined in a fixed order: the output is bitwise reproducible.  Inside an
// item, tokens are processed in tiles of kTile: the tile is loaded once
// (any strides), normalised in a local buffer, and every row of A meets it
// through register-blocked products (gemm_rows in vec_math.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../proxy_attention.h"
#include "../proxy_attention_math.h"
#include "vec_math.h"

namespace icl_kernels {
namespace cpu {
namespace {

constexpr int64_t kTile = 32;        // tokens per tile
constexpr int64_t kMinSplit = 128;   // fewest tokens worth a work item of their own
constexpr int64_t kMaxItems = 64;    // work items per call, bounds the partial buffers

struct Partition {
  int64_t splits;      // token ranges per batch element
  int64_t split_len;   // tokens per range (a multiple of kTile)
};

Partition partition_tokens(int64_t B, int64_t N) {
  const int64_t by_size = std::max<int64_t>(1, (N + kMinSplit - 1) / kMinSplit);
  const int64_t cap = std::max<int64_t>(1, (kMaxItems + B - 1) / B);
  const int64_t want = std::min(by_size, cap);
  int64_t len = (N + want - 1) / want;
  len = (len + kTile - 1) / kTile * kTile;
  return Partition{(N + len - 1) / len, len};
}

// Software prefetch of `runs` runs of `len` elements.  Used when tokens are a
// strided view with runs along N (a [B, C, N] map viewed as [B, N, C]): a
// tile is then C short runs on C different pages, too many streams for the
// hardware prefetchers, and the loads wait on memory (measured: about half
// of the backward's time).  The tile loops prefetch the next tile, and
// transpose_copy the next block of 8 runs inside a tile.  Rows of tokens
// (sc == 1) are left to the hardware.
template <typename T>
ICL_ALWAYS_INLINE void prefetch_runs(const T* p, int64_t runs, int64_t run_stride, int64_t len, bool write) {
  constexpr int64_t kLine = 64;
  const int64_t bytes = len * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < runs; ++r) {
    const char* q = reinterpret_cast<const char*>(p + r * run_stride);
    for (int64_t off = 0; off < bytes; off += kLine) {
      if (write)
        __builtin_prefetch(q + off, 1, 3);
      else
        __builtin_prefetch(q + off, 0, 3);
    }
  }
}

// dst[j * dld + i] = src[i * sld + j] for i < R, j < Cc: the transposing copies
// between x-shaped memory, S, dS and the local tiles.  The side in strided
// memory (src rows when kStridedSrc, else dst rows) is walked one block of 8
// runs at a time, with the next block prefetched; float blocks of 8x8 go
// through vector shuffles.
template <bool kStridedSrc, typename S, typename D>
ICL_ALWAYS_INLINE void transpose_copy(const S* src, int64_t sld, D* dst, int64_t dld, int64_t R, int64_t Cc) {
  constexpr bool kVector = ICL_HAVE_TRANSPOSE8 && std::is_same<S, float>::value && std::is_same<D, float>::value;
  // One block of at most 8 x 8: rows [i0, i0 + ib) of src, columns [j0, j0 + jb).
  auto block = [&](int64_t i0, int64_t ib, int64_t j0, int64_t jb) {
#if ICL_HAVE_TRANSPOSE8
    if constexpr (kVector) {
      if (ib == 8 && jb == 8) {
        transpose8x8(src + i0 * sld + j0, sld, dst + j0 * dld + i0, dld);
        return;
      }
    }
#endif
    for (int64_t i = i0; i < i0 + ib; ++i)
      for (int64_t j = j0; j < j0 + jb; ++j) dst[j * dld + i] = static_cast<D>(src[i * sld + j]);
  };
  // Outer loop over blocks of strided runs (prefetching the next block), inner along the runs.
  const int64_t outer = kStridedSrc ? R : Cc, inner = kStridedSrc ? Cc : R;
  for (int64_t o0 = 0; o0 < outer; o0 += 8) {
    const int64_t ob = std::min<int64_t>(8, outer - o0);
    if (o0 + 8 < outer) {
      const int64_t nb = std::min<int64_t>(8, outer - o0 - 8);
      if (kStridedSrc)
        prefetch_runs(src + (o0 + 8) * sld, nb, sld, inner, false);
      else
        prefetch_runs(dst + (o0 + 8) * dld, nb, dld, inner, true);
    }
    for (int64_t n0 = 0; n0 < inner; n0 += 8) {
      const int64_t nb = std::min<int64_t>(8, inner - n0);
      if (kStridedSrc)
        block(o0, ob, n0, nb);
      else
        block(n0, nb, o0, ob);
    }
  }
}

// Copies T tokens (any strides) into tile[t * ld + ch] as acc_t and, when
// has_eps, normalises each token in place and records its rstd.  Channels
// ch >= C of the tile are left untouched (callers keep them zero).
template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void load_tokens(const scalar_t* x, int64_t sn, int64_t sc, int64_t T, int64_t C,
                                   int64_t ld, bool has_eps, acc_t eps, acc_t* tile, acc_t* rstd) {
  if (sc == 1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < C; ++ch) tile[t * ld + ch] = static_cast<acc_t>(x[t * sn + ch]);
  } else if (sn == 1) {  // a [B, C, N] map viewed as tokens: runs along N
    transpose_copy<true>(x, sc, tile, ld, C, T);
  } else {
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t t = 0; t < T; ++t) tile[t * ld + ch] = static_cast<acc_t>(x[t * sn + ch * sc]);
  }
  if (!has_eps) return;
  // Per-token statistics with vector accumulators over the padded channels
  // (a scalar sum is one long dependency chain per token).  The padding is
  // zero, so it adds nothing to the sum; the tail mask keeps it out of the
  // squared deviations.
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const int64_t Cp = round_up(C, W);
  V tail_mask;
  for (int64_t i = 0; i < W; ++i) tail_mask[i] = (Cp - W + i) < C ? acc_t(1) : acc_t(0);
  for (int64_t t = 0; t < T; ++t) {
    acc_t* row = tile + t * ld;
    V vs{};
    for (int64_t ch = 0; ch < Cp; ch += W) vs += vload<V>(row + ch);
    const acc_t mean = hsum(vs) / acc_t(C);
    V vq{};
    for (int64_t ch = 0; ch + W < Cp; ch += W) {
      const V d = vload<V>(row + ch) - mean;
      vq += d * d;
    }
    const V dl = (vload<V>(row + Cp - W) - mean) * tail_mask;
    vq += dl * dl;
    const acc_t r = token_rstd<acc_t>(hsum(vq), C, eps);
    for (int64_t ch = 0; ch < C; ++ch) row[ch] = (row[ch] - mean) * r;
    rstd[t] = r;
  }
}

// The inverse of load_tokens' copy: tile[t * ld + ch] to x-shaped memory,
// walking the output's contiguous axis (a [B, C, N] layout gets runs along N).
template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void store_tokens(const acc_t* tile, int64_t T, int64_t C, int64_t ld, scalar_t* out,
                                    int64_t sn, int64_t sc) {
  if (sc == 1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < C; ++ch) out[t * sn + ch] = static_cast<scalar_t>(tile[t * ld + ch]);
  } else if (sn == 1) {
    transpose_copy<false>(tile, ld, out, sc, T, C);
  } else {
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t t = 0; t < T; ++t) out[t * sn + ch * sc] = static_cast<scalar_t>(tile[t * ld + ch]);
  }
}

// Local buffers are padded: channels to Cp and rows to Mp, multiples of the
// SIMD width, with zeros in the padding so that it adds nothing to any sum.
template <typename scalar_t, typename acc_t>
struct ForwardItem {
  const scalar_t* x;
  int64_t sxb, sxn, sxc;
  const acc_t* A;     // [B, M, C]
  const acc_t* c;     // [B, M]
  scalar_t* S;        // [B, M, N]
  acc_t* part_max;    // [B, splits, M]
  acc_t* part_sum;    // [B, splits, M]
  acc_t* part_z;      // [B, splits, M, C]
  int64_t N, C, M;
  Partition part;
  bool has_eps;
  acc_t eps;
};

template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void forward_item_impl(const ForwardItem<scalar_t, acc_t>& a, int64_t b, int64_t s) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const int64_t N = a.N, C = a.C, M = a.M;
  const int64_t Cp = round_up(C, W), Mp = round_up(M, W);
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(N, n_begin + a.part.split_len);
  const acc_t* A = a.A + b * M * C;
  const acc_t* c = a.c + b * M;
  // AT[ch, m] = A[m, ch]: logits of a tile are S^T[t, :] = xhat[t] @ AT, vectorised over m.
  std::vector<acc_t> AT(Cp * Mp, acc_t(0)), bias(Mp, acc_t(0)), tile(kTile * Cp, acc_t(0)),
      logits(kTile * Mp), z(M * Cp, acc_t(0)), rstd(kTile), mx(Mp, neg_infinity<acc_t>()),
      l(Mp, acc_t(0)), new_max(Mp);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t ch = 0; ch < C; ++ch) AT[ch * Mp + m] = A[m * C + ch];
    bias[m] = c[m];
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t T = std::min(kTile, n_end - n0);
    if (a.sxn == 1 && n0 + kTile < n_end)
      prefetch_runs(a.x + b * a.sxb + (n0 + kTile), C, a.sxc, std::min(kTile, n_end - n0 - kTile), false);
    load_tokens<scalar_t, acc_t>(a.x + b * a.sxb + n0 * a.sxn, a.sxn, a.sxc, T, C, Cp, a.has_eps,
                                 a.eps, tile.data(), rstd.data());
    gemm_rows<acc_t>(T, C, Mp, tile.data(), Cp, 1, AT.data(), Mp, logits.data(), Mp, false);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t m = 0; m < Mp; m += W)
        vstore(&logits[t * Mp + m], vload<V>(&logits[t * Mp + m]) + vload<V>(&bias[m]));
    transpose_copy<false>(logits.data(), Mp, a.S + b * M * N + n0, N, T, M);
    // Online softmax: new running max per row, rescale what was accumulated.
    for (int64_t m = 0; m < Mp; m += W) {
      V v = vload<V>(&mx[m]);
      for (int64_t t = 0; t < T; ++t) v = vmax(v, vload<V>(&logits[t * Mp + m]));
      vstore(&new_max[m], v);
    }
    for (int64_t m = 0; m < M; ++m) {
      const acc_t alpha = rescale_factor(mx[m], new_max[m]);
      if (alpha != acc_t(1)) {
        acc_t* zrow = z.data() + m * Cp;
        for (int64_t ch = 0; ch < Cp; ++ch) zrow[ch] *= alpha;
        l[m] *= alpha;
      }
      mx[m] = new_max[m];
    }
    for (int64_t m = 0; m < Mp; m += W) {
      const V nm = vload<V>(&new_max[m]);
      V sum = vload<V>(&l[m]);
      for (int64_t t = 0; t < T; ++t) {
        const V p = vexp(vload<V>(&logits[t * Mp + m]) - nm);
        vstore(&logits[t * Mp + m], p);
        sum += p;
      }
      vstore(&l[m], sum);
    }
    // z[m, :] += sum_t P[t, m] xhat[t, :]
    gemm_rows<acc_t>(M, T, Cp, logits.data(), 1, Mp, tile.data(), Cp, z.data(), Cp, true);
  }
  const int64_t item = b * a.part.splits + s;
  for (int64_t m = 0; m < M; ++m) {
    a.part_max[item * M + m] = mx[m];
    a.part_sum[item * M + m] = l[m];
    std::copy(z.data() + m * Cp, z.data() + m * Cp + C, a.part_z + (item * M + m) * C);
  }
}

ICL_CPU_WORK_ITEM(forward_item, ForwardItem<float, float>)
ICL_CPU_WORK_ITEM(forward_item, ForwardItem<double, double>)

template <typename scalar_t, typename acc_t>
struct BackwardItem {
  const scalar_t* x;
  int64_t sxb, sxn, sxc;
  scalar_t* dx;
  int64_t sdb, sdn, sdc;
  const acc_t* A;        // [B, M, C]
  const acc_t* c;        // [B, M]
  const acc_t* dZ;       // [B, M, C] (zeros when grad_Z is absent)
  const acc_t* D;        // [B, M] = dZ . Z
  const acc_t* lse;      // [B, M]
  const scalar_t* dS;    // [B, M, N] or null
  acc_t* part_dA;        // [B, splits, M, C]
  acc_t* part_dc;        // [B, splits, M]
  int64_t N, C, M;
  Partition part;
  bool has_eps;
  acc_t eps;
};

template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void backward_item_impl(const BackwardItem<scalar_t, acc_t>& a, int64_t b, int64_t s) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const int64_t N = a.N, C = a.C, M = a.M;
  const int64_t Cp = round_up(C, W), Mp = round_up(M, W), M2 = 2 * Mp;
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(N, n_begin + a.part.split_len);
  const acc_t* A = a.A + b * M * C;
  const acc_t* dZ = a.dZ + b * M * C;
  // RT[ch, :] = [A[:, ch] | dZ[:, ch]] gives logits and dP = dZ . xhat in one product;
  // R[j, :] = A[j] for j < Mp, dZ[j - Mp] after: the rows of dxhat = dS^T A + P^T dZ.
  std::vector<acc_t> RT(Cp * M2, acc_t(0)), R(M2 * Cp, acc_t(0)), bias(Mp, acc_t(0)),
      lse(Mp, acc_t(0)), D(Mp, acc_t(0)), tile(kTile * Cp, acc_t(0)), rstd(kTile),
      g(kTile * M2), g_in(kTile * Mp, acc_t(0)), dxhat(kTile * Cp), dA(M * Cp, acc_t(0)),
      dc(Mp, acc_t(0));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t ch = 0; ch < C; ++ch) {
      RT[ch * M2 + m] = A[m * C + ch];
      RT[ch * M2 + Mp + m] = dZ[m * C + ch];
      R[m * Cp + ch] = A[m * C + ch];
      R[(Mp + m) * Cp + ch] = dZ[m * C + ch];
    }
    bias[m] = a.c[b * M + m];
    lse[m] = a.lse[b * M + m];
    D[m] = a.D[b * M + m];
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t T = std::min(kTile, n_end - n0);
    if (n0 + kTile < n_end) {
      const int64_t Tn = std::min(kTile, n_end - n0 - kTile);
      if (a.sxn == 1) prefetch_runs(a.x + b * a.sxb + (n0 + kTile), C, a.sxc, Tn, false);
      if (a.sdn == 1) prefetch_runs(a.dx + b * a.sdb + (n0 + kTile), C, a.sdc, Tn, true);
      if (a.dS) prefetch_runs(a.dS + b * M * N + (n0 + kTile), M, N, Tn, false);
    }
    load_tokens<scalar_t, acc_t>(a.x + b * a.sxb + n0 * a.sxn, a.sxn, a.sxc, T, C, Cp, a.has_eps,
                                 a.eps, tile.data(), rstd.data());
    gemm_rows<acc_t>(T, C, M2, tile.data(), Cp, 1, RT.data(), M2, g.data(), M2, false);
    if (a.dS) {
      transpose_copy<true>(a.dS + b * M * N + n0, N, g_in.data(), Mp, M, T);
    }
    // g[t, :Mp] <- dS (the logits' gradient), g[t, Mp:] <- P.
    for (int64_t m = 0; m < Mp; m += W) {
      const V bm = vload<V>(&bias[m]), lm = vload<V>(&lse[m]), dm = vload<V>(&D[m]);
      V csum = vload<V>(&dc[m]);
      for (int64_t t = 0; t < T; ++t) {
        const V p = vexp(vload<V>(&g[t * M2 + m]) + bm - lm);
        const V dp = vload<V>(&g[t * M2 + Mp + m]);
        const V ds = vload<V>(&g_in[t * Mp + m]) + p * (dp - dm);
        vstore(&g[t * M2 + m], ds);
        vstore(&g[t * M2 + Mp + m], p);
        csum += ds;
      }
      vstore(&dc[m], csum);
    }
    // dA[m, :] += sum_t dS[t, m] xhat[t, :]
    gemm_rows<acc_t>(M, T, Cp, g.data(), 1, M2, tile.data(), Cp, dA.data(), Cp, true);
    // dxhat[t, :] = sum_m dS[t, m] A[m, :] + P[t, m] dZ[m, :]
    gemm_rows<acc_t>(T, M, Cp, g.data(), M2, 1, R.data(), Cp, dxhat.data(), Cp, false);
    gemm_rows<acc_t>(T, M, Cp, g.data() + Mp, M2, 1, R.data() + Mp * Cp, Cp, dxhat.data(), Cp, true);
    // LayerNorm backward in place (dxhat -> dx), then one store pass in x's layout.
    if (a.has_eps) {
      for (int64_t t = 0; t < T; ++t) {
        acc_t* d = dxhat.data() + t * Cp;
        const acc_t* xh = tile.data() + t * Cp;
        // dxhat and xhat are zero in the padded channels: vector sums over Cp.
        V v1{}, v2{};
        for (int64_t ch = 0; ch < Cp; ch += W) {
          const V dv = vload<V>(d + ch);
          v1 += dv;
          v2 += dv * vload<V>(xh + ch);
        }
        const acc_t mean1 = hsum(v1) / acc_t(C), mean2 = hsum(v2) / acc_t(C);
        for (int64_t ch = 0; ch < C; ++ch)
          d[ch] = layer_norm_input_grad<acc_t>(d[ch], xh[ch], rstd[t], mean1, mean2);
      }
    }
    store_tokens<scalar_t, acc_t>(dxhat.data(), T, C, Cp, a.dx + b * a.sdb + n0 * a.sdn, a.sdn, a.sdc);
  }
  const int64_t item = b * a.part.splits + s;
  for (int64_t m = 0; m < M; ++m) {
    std::copy(dA.data() + m * Cp, dA.data() + m * Cp + C, a.part_dA + (item * M + m) * C);
    a.part_dc[item * M + m] = dc[m];
  }
}

ICL_CPU_WORK_ITEM(backward_item, BackwardItem<float, float>)
ICL_CPU_WORK_ITEM(backward_item, BackwardItem<double, double>)

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "proxy_attention (cpu backend): supports float32 and float64, got ",
                   x.scalar_type(), "; use backend='torch' for other dtypes on CPU");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_forward_cpu(
    const at::Tensor& x, const at::Tensor& A_in, const at::Tensor& c_in, std::optional<double> eps) {
  check_proxy_attention_inputs(x, A_in, c_in, eps);
  check_cpu_dtype(x);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A_in.size(1);
  auto Z = at::empty({B, M, C}, x.options());
  auto S = at::empty({B, M, N}, x.options());
  auto lse = at::empty({B, M}, x.options().dtype(lse_dtype(x.scalar_type())));
  if (B == 0 || M == 0) return {Z, S, lse};

  const Partition part = partition_tokens(B, N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_attention_forward_cpu", [&] {
    using acc_t = scalar_t;  // float accumulates in float, double in double
    auto A = A_in.contiguous();
    auto c = c_in.contiguous();
    auto acc_opts = x.options();
    auto part_max = at::empty({B, part.splits, M}, acc_opts);
    auto part_sum = at::empty({B, part.splits, M}, acc_opts);
    auto part_z = at::empty({B, part.splits, M, C}, acc_opts);
    ForwardItem<scalar_t, acc_t> args{
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
        A.data_ptr<acc_t>(), c.data_ptr<acc_t>(), S.data_ptr<scalar_t>(),
        part_max.data_ptr<acc_t>(), part_sum.data_ptr<acc_t>(), part_z.data_ptr<acc_t>(),
        N, C, M, part, eps.has_value(), static_cast<acc_t>(eps.value_or(0.0))};
    at::parallel_for(0, B * part.splits, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) forward_item(args, i / part.splits, i % part.splits);
    });
    // Combine the token ranges in a fixed order.
    const acc_t* pm = args.part_max;
    const acc_t* ps = args.part_sum;
    const acc_t* pz = args.part_z;
    scalar_t* Zp = Z.data_ptr<scalar_t>();
    acc_t* lsep = lse.data_ptr<acc_t>();
    const int64_t splits = part.splits;
    at::parallel_for(0, B * M, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> zacc(C);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / M, m = i % M;
        SoftmaxState<acc_t> st{neg_infinity<acc_t>(), acc_t(0)};
        std::fill(zacc.begin(), zacc.end(), acc_t(0));
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t k = (b * splits + s) * M + m;
          acc_t fa, fb;
          st = merge_softmax_states<acc_t>(st, SoftmaxState<acc_t>{pm[k], ps[k]}, &fa, &fb);
          const acc_t* zs = pz + k * C;
          for (int64_t ch = 0; ch < C; ++ch) zacc[ch] = zacc[ch] * fa + zs[ch] * fb;
        }
        const acc_t inv = acc_t(1) / st.sum;
        for (int64_t ch = 0; ch < C; ++ch) Zp[i * C + ch] = static_cast<scalar_t>(zacc[ch] * inv);
        lsep[i] = log_sum_exp(st);
      }
    });
  });
  return {Z, S, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_backward_cpu(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A_in, const at::Tensor& c_in, const at::Tensor& Z,
    const at::Tensor& lse_in, std::optional<double> eps) {
  check_proxy_attention_backward_inputs(grad_Z, grad_S, x, A_in, c_in, Z, lse_in, eps);
  check_cpu_dtype(x);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A_in.size(1);
  // dx keeps x's memory layout (a [B, C, N] buffer viewed as [B, N, C] gets the same view).
  auto dx = at::empty_like(x);
  auto dA = at::empty({B, M, C}, x.options());  // written whole by the reduction below
  auto dc = at::empty({B, M}, x.options());
  if (B == 0) return {dx, dA, dc};
  if (M == 0) {
    dx.zero_();
    return {dx, dA, dc};
  }
  const Partition part = partition_tokens(B, N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_attention_backward_cpu", [&] {
    using acc_t = scalar_t;
    auto A = A_in.contiguous();
    auto c = c_in.contiguous();
    auto lse = lse_in.contiguous();
    at::Tensor dZ = grad_Z.has_value() ? grad_Z->contiguous() : at::zeros({B, M, C}, x.options());
    // D[m] = dZ[m] . Z[m], the softmax backward's row constant (a loop: two ATen
    // ops and a temporary cost more host time than the work at training sizes).
    at::Tensor D = at::empty({B, M}, x.options());
    {
      auto Zc = Z.contiguous();
      const acc_t* zp = Zc.data_ptr<acc_t>();
      const acc_t* gp = dZ.data_ptr<acc_t>();
      acc_t* dp = D.data_ptr<acc_t>();
      at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t sum = 0;
          for (int64_t ch = 0; ch < C; ++ch) sum += gp[i * C + ch] * zp[i * C + ch];
          dp[i] = sum;
        }
      });
    }
    at::Tensor dS = grad_S.has_value() ? grad_S->contiguous() : at::Tensor();
    auto part_dA = at::empty({B, part.splits, M, C}, x.options());
    auto part_dc = at::empty({B, part.splits, M}, x.options());
    BackwardItem<scalar_t, acc_t> args{
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
        dx.data_ptr<scalar_t>(), dx.stride(0), dx.stride(1), dx.stride(2),
        A.data_ptr<acc_t>(), c.data_ptr<acc_t>(), dZ.data_ptr<acc_t>(), D.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), dS.defined() ? dS.data_ptr<scalar_t>() : nullptr,
        part_dA.data_ptr<acc_t>(), part_dc.data_ptr<acc_t>(),
        N, C, M, part, eps.has_value(), static_cast<acc_t>(eps.value_or(0.0))};
    at::parallel_for(0, B * part.splits, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) backward_item(args, i / part.splits, i % part.splits);
    });
    // Fixed-order reduction over token ranges (deterministic).
    const acc_t* pdA = args.part_dA;
    const acc_t* pdc = args.part_dc;
    scalar_t* dAp = dA.data_ptr<scalar_t>();
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    const int64_t splits = part.splits;
    at::parallel_for(0, B * M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / M, m = i % M;
        acc_t csum = 0;
        std::fill(dAp + i * C, dAp + (i + 1) * C, scalar_t(0));
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t k = (b * splits + s) * M + m;
          const acc_t* src = pdA + k * C;
          for (int64_t ch = 0; ch < C; ++ch) dAp[i * C + ch] += src[ch];
          csum += pdc[k];
        }
        dcp[i] = csum;
      }
    });
  });
  return {dx, dA, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_kernels, CPU, m) {
  m.impl("_proxy_attention_forward", &proxy_attention_forward_cpu);
  m.impl("_proxy_attention_backward", &proxy_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace icl_kernels
