// CPU kernels of the prototype update: per-class sums [K, C] and totals [K] in
// one pass over the features, and their backward.
//
// Determinism: work is split into (batch, token range) items by a rule that
// depends only on the shapes; each item accumulates its own [K, C] partial and
// the partials are added in item order, so the result is bitwise the same
// whatever the thread count.  Nothing [B, K, N]-sized is ever built.
//
// Inside an item tokens go in tiles:
//  - labels, token axis contiguous (NCHW maps): a tile holding few classes
//    (label maps are piecewise constant, so most tiles hold one or two) is
//    reduced along each channel row with vector selects, one accumulator per
//    class present;
//  - labels otherwise: each token's channel vector is added to its class row,
//    read in place when channels are contiguous (channels-last maps, the
//    [B, K, C] values form), after a transpose into a local tile when not;
//  - probs: per tile a [K, T] x [T, C] product as register-blocked dot
//    products along the token axis.
// Labels outside [0, K) other than ignore_index are recorded per item and
// raised after the pass (always on CPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../prototype_update.h"
#include "vec_math.h"

namespace icl_kernels {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;           // tokens per tile, labels form
constexpr int64_t kTileProbs = 64;       // tokens per tile, probs form (a [C, T] tile stays in cache)
constexpr int64_t kMinItemTokens = 4096; // fewest tokens worth a work item of their own
constexpr int64_t kMaxItems = 64;        // bounds the partial buffers
constexpr int kMaxMaskClasses = 4;       // a tile with more classes takes the scatter path
// Below this many feature elements a call runs on the calling thread: waking
// the OpenMP team costs more than the work (milliseconds on a loaded machine).
constexpr int64_t kMinParallelElements = int64_t(1) << 16;

// Runs work(i) for every item.  Threads take items from a shared counter
// rather than a fixed share: on a loaded machine a descheduled thread then
// delays the call by at most the item it holds, not by its whole share.  Which
// thread runs an item does not matter: each item writes its own partial slot.
template <typename F>
void run_items(int64_t items, int64_t elements, const F& work) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  if (elements < kMinParallelElements || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < items; ++i) work(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) work(i);
  });
}

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// 32-byte vectors of the accumulation type and a same-width integer vector for
// the class ids, so that `class == k ? x : 0` is one vector compare and select.
template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t VI __attribute__((vector_size(32)));
  typedef int32_t cls_t;
  static constexpr int64_t W = 8;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t VI __attribute__((vector_size(32)));
  typedef int64_t cls_t;
  static constexpr int64_t W = 4;
};

struct Partition {
  int64_t splits;     // token ranges per batch element
  int64_t split_len;  // tokens per range (a multiple of the tile)
};

Partition partition_tokens(int64_t B, int64_t N, int64_t tile) {
  const int64_t by_size = std::max<int64_t>(1, N / kMinItemTokens);
  const int64_t cap = std::max<int64_t>(1, kMaxItems / std::max<int64_t>(B, 1));
  const int64_t want = std::min(by_size, cap);
  const int64_t len = round_up((N + want - 1) / want, tile);
  return Partition{(N + len - 1) / len, len};
}

struct LabelView {
  const void* ptr;
  bool is64;
  int64_t sb, sn;
  ICL_ALWAYS_INLINE int64_t at(int64_t b, int64_t n) const {
    const int64_t off = b * sb + n * sn;
    return is64 ? static_cast<const int64_t*>(ptr)[off]
                : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[off]);
  }
};

LabelView label_view(const at::Tensor& labels) {
  return LabelView{labels.data_ptr(), labels.scalar_type() == at::kLong, labels.stride(0),
                   labels.stride(1)};
}

// cls[t] <- the class of token n0 + t, or -1 when it does not count (ignored,
// invalid, or, with skip_zero_weight, weight 0: such a token adds nothing even
// where its features are not finite); wt[t] <- its weight (1 without weights).
// The first invalid label is kept in *first_bad.
template <typename acc_t, typename cls_t>
ICL_ALWAYS_INLINE void load_classes(const LabelView& lab, const acc_t* w, int64_t swb, int64_t swn,
                                    int64_t b, int64_t n0, int64_t T, int64_t K, int64_t ignore,
                                    bool skip_zero_weight, cls_t* cls, acc_t* wt,
                                    int64_t* first_bad) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t l = lab.at(b, n0 + t);
    cls_t k = -1;
    if (l != ignore) {
      if (l >= 0 && l < K) {
        k = static_cast<cls_t>(l);
      } else if (*first_bad == kNoInvalidLabel) {
        *first_bad = l;
      }
    }
    acc_t wv = acc_t(1);
    if (w != nullptr) {
      wv = w[b * swb + (n0 + t) * swn];
      if (skip_zero_weight && wv == acc_t(0)) k = -1;
    }
    cls[t] = k;
    wt[t] = wv;
  }
}

// tile[t * ld + c] <- f[t * sn + c * sc] for T tokens and C channels, as acc_t.
template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void load_token_major(const scalar_t* f, int64_t sc, int64_t sn, int64_t T,
                                        int64_t C, int64_t ld, acc_t* tile) {
  if (sc == 1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) tile[t * ld + c] = static_cast<acc_t>(f[t * sn + c]);
  } else {  // read along the token axis, which is the contiguous one in NCHW maps
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t) tile[t * ld + c] = static_cast<acc_t>(f[t * sn + c * sc]);
  }
}

// tile[c * ld + t] <- f[t * sn + c * sc] for T tokens and C rows; entries
// T <= t < ld are zeroed so that vector loops may run over the whole row.
template <typename scalar_t, typename acc_t>
ICL_ALWAYS_INLINE void load_channel_major(const scalar_t* f, int64_t sc, int64_t sn, int64_t T,
                                          int64_t C, int64_t ld, acc_t* tile) {
  if (sn == 1 || sc != 1) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < T; ++t) tile[c * ld + t] = static_cast<acc_t>(f[t * sn + c * sc]);
      for (int64_t t = T; t < ld; ++t) tile[c * ld + t] = acc_t(0);
    }
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) tile[c * ld + t] = static_cast<acc_t>(f[t * sn + c]);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = T; t < ld; ++t) tile[c * ld + t] = acc_t(0);
  }
}

template <typename V, typename acc_t>
ICL_ALWAYS_INLINE acc_t hsum(const V& v, int64_t W) {
  acc_t s = 0;
  for (int64_t l = 0; l < W; ++l) s += v[l];  // fixed lane order
  return s;
}

// GCC flags the vector broadcast `VI{} + k` below as a read of uninitialised lanes (it is not).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// *out[j] += sum_t [cls[t] == ks[j]] * (wt[t] *) row[t] for NP classes at once.
template <typename acc_t, int NP, bool kWeighted>
ICL_ALWAYS_INLINE void masked_row_sums(const acc_t* row, const typename Simd<acc_t>::cls_t* cls,
                                       const acc_t* wt, int64_t T, const int64_t* ks,
                                       acc_t* const* out) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  using VI = typename S::VI;
  using cls_t = typename S::cls_t;
  constexpr int64_t W = S::W;
  V acc[NP] = {};
  VI kv[NP] = {};
  for (int j = 0; j < NP; ++j) kv[j] = VI{} + static_cast<cls_t>(ks[j]);
  int64_t t = 0;
  for (; t + W <= T; t += W) {
    V x = vload<V>(row + t);
    if (kWeighted) x = x * vload<V>(wt + t);
    const VI c = vload<VI>(cls + t);
    for (int j = 0; j < NP; ++j) acc[j] += (c == kv[j]) ? x : V{};
  }
  for (int j = 0; j < NP; ++j) {
    acc_t s = hsum<V, acc_t>(acc[j], W);
    for (int64_t u = t; u < T; ++u)
      if (cls[u] == ks[j]) s += kWeighted ? row[u] * wt[u] : row[u];
    *out[j] += s;
  }
}
#pragma GCC diagnostic pop

// dst[0:C] += (w *) src[0:C]
template <typename acc_t, bool kWeighted>
ICL_ALWAYS_INLINE void add_row(acc_t* dst, const acc_t* src, int64_t C, acc_t w) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t W = Simd<acc_t>::W;
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    const V x = vload<V>(src + c);
    vstore(dst + c, vload<V>(dst + c) + (kWeighted ? x * w : x));
  }
  for (; c < C; ++c) dst[c] += kWeighted ? src[c] * w : src[c];
}

// ---------------------------------------------------------------- labels, forward

template <typename scalar_t>
struct LabelsForward {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  LabelView lab;
  const acc_t* w;  // null without weights
  int64_t swb, swn;
  acc_t* part_sums;  // [items, K, C]
  acc_t* part_tot;   // [items, K]
  int64_t* first_bad;  // [items]
  int64_t N, C, K, ignore_index;
  Partition part;
};

template <typename scalar_t, bool kWeighted>
ICL_ALWAYS_INLINE void labels_forward_item_t(const LabelsForward<scalar_t>& a, int64_t b, int64_t s) {
  using acc_t = acc_of<scalar_t>;
  using S = Simd<acc_t>;
  using cls_t = typename S::cls_t;
  constexpr bool kSameType = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, K = a.K;
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(a.N, n_begin + a.part.split_len);
  const int64_t item = b * a.part.splits + s;
  const scalar_t* fb = a.f + b * a.sfb;
  const bool tokens_contiguous = a.sfn == 1;
  const bool rows_in_place = kSameType && a.sfc == 1;

  std::vector<acc_t> acc(K * C, acc_t(0)), tot(K, acc_t(0)), wt(kTile), rowbuf;
  std::vector<acc_t> tile;
  std::vector<cls_t> cls(kTile);
  std::vector<uint8_t> seen(K, 0);
  std::vector<int64_t> present;
  present.reserve(K);
  if (!kSameType && tokens_contiguous) rowbuf.resize(kTile);
  int64_t first_bad = kNoInvalidLabel;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t T = std::min(kTile, n_end - n0);
    load_classes<acc_t, cls_t>(a.lab, a.w, a.swb, a.swn, b, n0, T, K, a.ignore_index, true,
                               cls.data(), wt.data(), &first_bad);
    present.clear();
    for (int64_t t = 0; t < T; ++t) {
      const cls_t k = cls[t];
      if (k < 0) continue;
      tot[k] += wt[t];
      if (!seen[k]) {
        seen[k] = 1;
        present.push_back(k);
      }
    }
    for (int64_t k : present) seen[k] = 0;
    if (present.empty()) continue;

    if (tokens_contiguous && static_cast<int>(present.size()) <= kMaxMaskClasses) {
      const int np = static_cast<int>(present.size());
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* src = fb + c * a.sfc + n0;
        const acc_t* row;
        if constexpr (kSameType) {
          row = reinterpret_cast<const acc_t*>(src);
        } else {
          for (int64_t t = 0; t < T; ++t) rowbuf[t] = static_cast<acc_t>(src[t]);
          row = rowbuf.data();
        }
        acc_t* out[kMaxMaskClasses];
        for (int j = 0; j < np; ++j) out[j] = &acc[present[j] * C + c];
        switch (np) {
          case 1: masked_row_sums<acc_t, 1, kWeighted>(row, cls.data(), wt.data(), T, present.data(), out); break;
          case 2: masked_row_sums<acc_t, 2, kWeighted>(row, cls.data(), wt.data(), T, present.data(), out); break;
          case 3: masked_row_sums<acc_t, 3, kWeighted>(row, cls.data(), wt.data(), T, present.data(), out); break;
          default: masked_row_sums<acc_t, 4, kWeighted>(row, cls.data(), wt.data(), T, present.data(), out); break;
        }
      }
    } else if (rows_in_place) {
      for (int64_t t = 0; t < T; ++t) {
        if (cls[t] < 0) continue;
        add_row<acc_t, kWeighted>(&acc[cls[t] * C], reinterpret_cast<const acc_t*>(fb + (n0 + t) * a.sfn),
                                  C, wt[t]);
      }
    } else {
      if (tile.empty()) tile.resize(kTile * C);
      load_token_major<scalar_t, acc_t>(fb + n0 * a.sfn, a.sfc, a.sfn, T, C, C, tile.data());
      for (int64_t t = 0; t < T; ++t) {
        if (cls[t] < 0) continue;
        add_row<acc_t, kWeighted>(&acc[cls[t] * C], tile.data() + t * C, C, wt[t]);
      }
    }
  }
  std::copy(acc.begin(), acc.end(), a.part_sums + item * K * C);
  std::copy(tot.begin(), tot.end(), a.part_tot + item * K);
  a.first_bad[item] = first_bad;
}

template <typename scalar_t>
ICL_ALWAYS_INLINE void labels_forward_item_impl(const LabelsForward<scalar_t>& a, int64_t b, int64_t s) {
  if (a.w != nullptr) {
    labels_forward_item_t<scalar_t, true>(a, b, s);
  } else {
    labels_forward_item_t<scalar_t, false>(a, b, s);
  }
}

ICL_CPU_WORK_ITEM(labels_forward_item, LabelsForward<float>)
ICL_CPU_WORK_ITEM(labels_forward_item, LabelsForward<double>)
ICL_CPU_WORK_ITEM(labels_forward_item, LabelsForward<at::Half>)
ICL_CPU_WORK_ITEM(labels_forward_item, LabelsForward<at::BFloat16>)

// ---------------------------------------------------------------- labels, backward

template <typename scalar_t>
struct LabelsBackward {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  LabelView lab;
  const acc_t* w;  // null without weights
  int64_t swb, swn;
  const acc_t* G;   // grad_sums [K, C]
  const acc_t* GT;  // [C, K + 1]: GT[c, 0] = 0, GT[c, k + 1] = G[k, c] (a gather with no branch)
  const acc_t* gt;  // grad_totals [K]
  scalar_t* gf;     // [B, C, N] with strides, or null
  int64_t sgb, sgc, sgn;
  acc_t* gw;  // [B, N] contiguous, or null
  int64_t N, C, K, ignore_index;
  Partition part;
};

// grad_features[b, :, n] = w[b, n] * grad_sums[label]; grad_weights[b, n] =
// grad_sums[label] . features[b, :, n] + grad_totals[label]; zero for tokens
// whose label does not count.  A token of weight 0 gets its true derivative.
template <typename scalar_t>
ICL_ALWAYS_INLINE void labels_backward_item_impl(const LabelsBackward<scalar_t>& a, int64_t b, int64_t s) {
  using acc_t = acc_of<scalar_t>;
  using cls_t = typename Simd<acc_t>::cls_t;
  const int64_t C = a.C, K = a.K, K1 = a.K + 1;
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(a.N, n_begin + a.part.split_len);
  std::vector<cls_t> cls(kTile);
  std::vector<int32_t> idx(kTile);
  std::vector<acc_t> wt(kTile), gacc(kTile);
  int64_t unused_bad = kNoInvalidLabel;
  const scalar_t* fb = a.f + b * a.sfb;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t T = std::min(kTile, n_end - n0);
    load_classes<acc_t, cls_t>(a.lab, a.w, a.swb, a.swn, b, n0, T, K, a.ignore_index, false,
                               cls.data(), wt.data(), &unused_bad);
    for (int64_t t = 0; t < T; ++t) idx[t] = static_cast<int32_t>(cls[t]) + 1;
    if (a.gf != nullptr) {
      scalar_t* gb = a.gf + b * a.sgb + n0 * a.sgn;
      if (a.sgn == 1) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* col = a.GT + c * K1;
          scalar_t* out = gb + c * a.sgc;
          if (a.w != nullptr) {
            for (int64_t t = 0; t < T; ++t) out[t] = static_cast<scalar_t>(col[idx[t]] * wt[t]);
          } else {
            for (int64_t t = 0; t < T; ++t) out[t] = static_cast<scalar_t>(col[idx[t]]);
          }
        }
      } else {
        for (int64_t t = 0; t < T; ++t) {
          scalar_t* out = gb + t * a.sgn;
          const cls_t k = cls[t];
          if (k < 0) {
            for (int64_t c = 0; c < C; ++c) out[c * a.sgc] = static_cast<scalar_t>(0);
          } else {
            const acc_t* g = a.G + k * C;
            for (int64_t c = 0; c < C; ++c) out[c * a.sgc] = static_cast<scalar_t>(g[c] * wt[t]);
          }
        }
      }
    }
    if (a.gw != nullptr) {
      if (a.sfn == 1) {
        std::fill(gacc.begin(), gacc.begin() + T, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* col = a.GT + c * K1;
          const scalar_t* row = fb + c * a.sfc + n0;
          for (int64_t t = 0; t < T; ++t) gacc[t] += col[idx[t]] * static_cast<acc_t>(row[t]);
        }
      } else {
        for (int64_t t = 0; t < T; ++t) {
          const cls_t k = cls[t];
          acc_t sum = 0;
          if (k >= 0) {
            const scalar_t* row = fb + (n0 + t) * a.sfn;
            const acc_t* g = a.G + k * C;
            for (int64_t c = 0; c < C; ++c) sum += g[c] * static_cast<acc_t>(row[c * a.sfc]);
          }
          gacc[t] = sum;
        }
      }
      acc_t* out = a.gw + b * a.N + n0;
      for (int64_t t = 0; t < T; ++t) out[t] = cls[t] < 0 ? acc_t(0) : gacc[t] + a.gt[cls[t]];
    }
  }
}

ICL_CPU_WORK_ITEM(labels_backward_item, LabelsBackward<float>)
ICL_CPU_WORK_ITEM(labels_backward_item, LabelsBackward<double>)
ICL_CPU_WORK_ITEM(labels_backward_item, LabelsBackward<at::Half>)
ICL_CPU_WORK_ITEM(labels_backward_item, LabelsBackward<at::BFloat16>)

// ---------------------------------------------------------------- probs, forward

template <typename scalar_t>
struct ProbsForward {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  const scalar_t* p;
  int64_t spb, spk, spn;
  acc_t* part_sums;  // [items, K, C]
  acc_t* part_tot;   // [items, K]
  int64_t N, C, K;
  Partition part;
};

// out[i, j] += sum_t p[i, t] * f[j, t] for a KB x CB block: KB + CB vector
// loads feed KB * CB accumulators (Tv: the vectorised prefix of T).
template <typename acc_t, int KB, int CB>
ICL_ALWAYS_INLINE void dot_block(const acc_t* p, int64_t ldp, const acc_t* f, int64_t ldf, int64_t Tv,
                                 int64_t T, acc_t* out, int64_t ldo) {
  using V = typename Simd<acc_t>::V;
  constexpr int64_t W = Simd<acc_t>::W;
  V acc[KB][CB];
  for (int i = 0; i < KB; ++i)
    for (int j = 0; j < CB; ++j) acc[i][j] = V{};
  for (int64_t t = 0; t < Tv; t += W) {
    V fv[CB];
    for (int j = 0; j < CB; ++j) fv[j] = vload<V>(f + j * ldf + t);
    for (int i = 0; i < KB; ++i) {
      const V pv = vload<V>(p + i * ldp + t);
      for (int j = 0; j < CB; ++j) acc[i][j] += pv * fv[j];
    }
  }
  for (int i = 0; i < KB; ++i) {
    for (int j = 0; j < CB; ++j) {
      acc_t sum = hsum<V, acc_t>(acc[i][j], W);
      for (int64_t t = Tv; t < T; ++t) sum += p[i * ldp + t] * f[j * ldf + t];
      out[i * ldo + j] += sum;
    }
  }
}

template <typename acc_t, int KB>
ICL_ALWAYS_INLINE void dot_rows(const acc_t* p, int64_t ldp, const acc_t* f, int64_t ldf, int64_t C,
                                int64_t Tv, int64_t T, acc_t* out, int64_t ldo) {
  int64_t c = 0;
  for (; c + 2 <= C; c += 2) dot_block<acc_t, KB, 2>(p, ldp, f + c * ldf, ldf, Tv, T, out + c, ldo);
  if (c < C) dot_block<acc_t, KB, 1>(p, ldp, f + c * ldf, ldf, Tv, T, out + c, ldo);
}

template <typename scalar_t>
ICL_ALWAYS_INLINE void probs_forward_item_impl(const ProbsForward<scalar_t>& a, int64_t b, int64_t s) {
  using acc_t = acc_of<scalar_t>;
  constexpr int64_t W = Simd<acc_t>::W;
  constexpr bool kSameType = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, K = a.K;
  const int64_t Tp = round_up(kTileProbs, W);
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(a.N, n_begin + a.part.split_len);
  const int64_t item = b * a.part.splits + s;
  const bool in_place = kSameType && a.sfn == 1;
  std::vector<acc_t> acc(K * C, acc_t(0)), tot(K, acc_t(0)), ptile(K * Tp), ftile;
  if (!in_place) ftile.resize(C * Tp);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileProbs) {
    const int64_t T = std::min(kTileProbs, n_end - n0);
    load_channel_major<scalar_t, acc_t>(a.p + b * a.spb + n0 * a.spn, a.spk, a.spn, T, K, Tp, ptile.data());
    for (int64_t k = 0; k < K; ++k) {
      acc_t sum = 0;
      for (int64_t t = 0; t < T; ++t) sum += ptile[k * Tp + t];
      tot[k] += sum;
    }
    const acc_t* frows;
    int64_t ldf, Tv;
    if (in_place) {
      frows = reinterpret_cast<const acc_t*>(a.f + b * a.sfb + n0);
      ldf = a.sfc;
      Tv = T / W * W;
    } else {
      load_channel_major<scalar_t, acc_t>(a.f + b * a.sfb + n0 * a.sfn, a.sfc, a.sfn, T, C, Tp, ftile.data());
      frows = ftile.data();
      ldf = Tp;
      Tv = round_up(T, W);  // zero padded
    }
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
      dot_rows<acc_t, 4>(ptile.data() + k * Tp, Tp, frows, ldf, C, Tv, T, acc.data() + k * C, C);
    switch (K - k) {
      case 3: dot_rows<acc_t, 3>(ptile.data() + k * Tp, Tp, frows, ldf, C, Tv, T, acc.data() + k * C, C); break;
      case 2: dot_rows<acc_t, 2>(ptile.data() + k * Tp, Tp, frows, ldf, C, Tv, T, acc.data() + k * C, C); break;
      case 1: dot_rows<acc_t, 1>(ptile.data() + k * Tp, Tp, frows, ldf, C, Tv, T, acc.data() + k * C, C); break;
      default: break;
    }
  }
  std::copy(acc.begin(), acc.end(), a.part_sums + item * K * C);
  std::copy(tot.begin(), tot.end(), a.part_tot + item * K);
}

ICL_CPU_WORK_ITEM(probs_forward_item, ProbsForward<float>)
ICL_CPU_WORK_ITEM(probs_forward_item, ProbsForward<double>)
ICL_CPU_WORK_ITEM(probs_forward_item, ProbsForward<at::Half>)
ICL_CPU_WORK_ITEM(probs_forward_item, ProbsForward<at::BFloat16>)

// ---------------------------------------------------------------- probs, backward

template <typename scalar_t>
struct ProbsBackward {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  const scalar_t* p;
  int64_t spb, spk, spn;
  const acc_t* G;   // [K, C]
  const acc_t* gt;  // [K]
  scalar_t* gf;     // or null
  int64_t sgb, sgc, sgn;
  scalar_t* gp;     // or null
  int64_t sqb, sqk, sqn;
  int64_t N, C, K;
  Partition part;
};

// grad_features[:, n] = sum_k probs[k, n] grad_sums[k];
// grad_probs[k, n] = grad_sums[k] . features[:, n] + grad_totals[k].
template <typename scalar_t>
ICL_ALWAYS_INLINE void probs_backward_item_impl(const ProbsBackward<scalar_t>& a, int64_t b, int64_t s) {
  using acc_t = acc_of<scalar_t>;
  using V = typename Simd<acc_t>::V;
  constexpr int64_t W = Simd<acc_t>::W;
  const int64_t C = a.C, K = a.K;
  const int64_t Tp = round_up(kTileProbs, W);
  const int64_t n_begin = s * a.part.split_len;
  const int64_t n_end = std::min(a.N, n_begin + a.part.split_len);
  const bool need_f = a.gf != nullptr, need_p = a.gp != nullptr;
  std::vector<acc_t> ptile(K * Tp), ftile, gp, gfrow(Tp);
  if (need_p) {
    ftile.resize(C * Tp);
    gp.resize(K * Tp);
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileProbs) {
    const int64_t T = std::min(kTileProbs, n_end - n0);
    load_channel_major<scalar_t, acc_t>(a.p + b * a.spb + n0 * a.spn, a.spk, a.spn, T, K, Tp, ptile.data());
    if (need_p) {
      load_channel_major<scalar_t, acc_t>(a.f + b * a.sfb + n0 * a.sfn, a.sfc, a.sfn, T, C, Tp, ftile.data());
      std::fill(gp.begin(), gp.end(), acc_t(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < Tp; t += W) {
        V gfv = V{};
        const V fv = need_p ? vload<V>(&ftile[c * Tp + t]) : V{};
        for (int64_t k = 0; k < K; ++k) {
          const acc_t g = a.G[k * C + c];
          if (need_f) gfv += g * vload<V>(&ptile[k * Tp + t]);
          if (need_p) vstore(&gp[k * Tp + t], vload<V>(&gp[k * Tp + t]) + g * fv);
        }
        if (need_f) vstore(&gfrow[t], gfv);
      }
      if (need_f) {
        scalar_t* out = a.gf + b * a.sgb + c * a.sgc + n0 * a.sgn;
        for (int64_t t = 0; t < T; ++t) out[t * a.sgn] = static_cast<scalar_t>(gfrow[t]);
      }
    }
    if (need_p) {
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* out = a.gp + b * a.sqb + k * a.sqk + n0 * a.sqn;
        for (int64_t t = 0; t < T; ++t) out[t * a.sqn] = static_cast<scalar_t>(gp[k * Tp + t] + a.gt[k]);
      }
    }
  }
}

ICL_CPU_WORK_ITEM(probs_backward_item, ProbsBackward<float>)
ICL_CPU_WORK_ITEM(probs_backward_item, ProbsBackward<double>)
ICL_CPU_WORK_ITEM(probs_backward_item, ProbsBackward<at::Half>)
ICL_CPU_WORK_ITEM(probs_backward_item, ProbsBackward<at::BFloat16>)

// ---------------------------------------------------------------- host side

// out[j] = sum over items, in item order, of part[item, j] (part: [items, M]).
template <typename acc_t>
void reduce_items(const acc_t* part, int64_t items, int64_t M, acc_t* out) {
  const int64_t grain = items * M < kMinParallelElements * 4 ? std::max<int64_t>(M, 1) : 256;
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) out[j] = part[j];
    for (int64_t i = 1; i < items; ++i) {
      const acc_t* src = part + i * M;
      for (int64_t j = begin; j < end; ++j) out[j] += src[j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> labels_forward_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                      const std::optional<at::Tensor>& weights,
                                                      int64_t num_classes, int64_t ignore_index,
                                                      bool /*check_labels: always on CPU*/,
                                                      bool /*deterministic: always on CPU*/) {
  check_prototype_labels_inputs(features, labels, weights, num_classes);
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = num_classes;
  const auto acc_opts = features.options().dtype(prototype_acc_dtype(features.scalar_type()));
  auto sums = at::zeros({K, C}, acc_opts);
  auto totals = at::zeros({K}, acc_opts);
  if (B == 0 || N == 0) return {sums, totals};
  const Partition part = partition_tokens(B, N, kTile);
  const int64_t items = B * part.splits;
  auto part_sums = at::empty({items, K, C}, acc_opts);
  auto part_tot = at::empty({items, K}, acc_opts);
  std::vector<int64_t> first_bad(items, kNoInvalidLabel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_labels_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    LabelsForward<scalar_t> args{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        label_view(labels),
        weights.has_value() ? weights->data_ptr<acc_t>() : nullptr,
        weights.has_value() ? weights->stride(0) : 0, weights.has_value() ? weights->stride(1) : 0,
        part_sums.data_ptr<acc_t>(), part_tot.data_ptr<acc_t>(), first_bad.data(),
        N, C, K, ignore_index, part};
    run_items(items, B * N * C, [&](int64_t i) { labels_forward_item(args, i / part.splits, i % part.splits); });
    for (int64_t i = 0; i < items; ++i)
      if (first_bad[i] != kNoInvalidLabel) throw_invalid_label(first_bad[i], K, ignore_index);
    reduce_items<acc_t>(args.part_sums, items, K * C, sums.data_ptr<acc_t>());
    reduce_items<acc_t>(args.part_tot, items, K, totals.data_ptr<acc_t>());
  });
  return {sums, totals};
}

// [C, K + 1] table of grad_sums with a zero column in front (for class -1).
at::Tensor gather_table(const at::Tensor& G) {
  auto zero = at::zeros({1, G.size(1)}, G.options());
  return at::cat({zero, G}, 0).t().contiguous();
}

std::tuple<at::Tensor, at::Tensor> labels_backward_cpu(
    const at::Tensor& grad_sums, const at::Tensor& grad_totals, const at::Tensor& features,
    const at::Tensor& labels, const std::optional<at::Tensor>& weights, int64_t ignore_index,
    bool need_features_grad, bool need_weights_grad) {
  const int64_t K = grad_sums.dim() >= 1 ? grad_sums.size(0) : 0;
  check_prototype_labels_inputs(features, labels, weights, std::max<int64_t>(K, 1));
  check_prototype_grads(grad_sums, grad_totals, features, K);
  TORCH_CHECK_VALUE(!need_weights_grad || weights.has_value(),
                    "prototype_update backward: need_weights_grad without weights");
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2);
  at::Tensor gf = need_features_grad ? at::empty_like(features) : features.new_empty({0});
  at::Tensor gw = need_weights_grad ? at::empty({B, N}, weights->options()) : grad_sums.new_empty({0});
  if (B == 0 || N == 0 || (!need_features_grad && !need_weights_grad)) return {gf, gw};
  const Partition part = partition_tokens(B, N, kTile);
  const int64_t items = B * part.splits;
  auto G = grad_sums.contiguous();
  auto GT = gather_table(G);
  auto gt = grad_totals.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_labels_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    LabelsBackward<scalar_t> args{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        label_view(labels),
        weights.has_value() ? weights->data_ptr<acc_t>() : nullptr,
        weights.has_value() ? weights->stride(0) : 0, weights.has_value() ? weights->stride(1) : 0,
        G.data_ptr<acc_t>(), GT.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
        need_features_grad ? gf.data_ptr<scalar_t>() : nullptr,
        need_features_grad ? gf.stride(0) : 0, need_features_grad ? gf.stride(1) : 0,
        need_features_grad ? gf.stride(2) : 0,
        need_weights_grad ? gw.data_ptr<acc_t>() : nullptr,
        N, C, K, ignore_index, part};
    run_items(items, B * N * C, [&](int64_t i) { labels_backward_item(args, i / part.splits, i % part.splits); });
  });
  return {gf, gw};
}

std::tuple<at::Tensor, at::Tensor> probs_forward_cpu(const at::Tensor& features, const at::Tensor& probs,
                                                     bool /*deterministic: always on CPU*/) {
  check_prototype_probs_inputs(features, probs);
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = probs.size(1);
  const auto acc_opts = features.options().dtype(prototype_acc_dtype(features.scalar_type()));
  auto sums = at::zeros({K, C}, acc_opts);
  auto totals = at::zeros({K}, acc_opts);
  if (B == 0 || N == 0) return {sums, totals};
  const Partition part = partition_tokens(B, N, kTileProbs);
  const int64_t items = B * part.splits;
  auto part_sums = at::empty({items, K, C}, acc_opts);
  auto part_tot = at::empty({items, K}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_probs_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    ProbsForward<scalar_t> args{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        probs.data_ptr<scalar_t>(), probs.stride(0), probs.stride(1), probs.stride(2),
        part_sums.data_ptr<acc_t>(), part_tot.data_ptr<acc_t>(), N, C, K, part};
    run_items(items, B * N * C, [&](int64_t i) { probs_forward_item(args, i / part.splits, i % part.splits); });
    reduce_items<acc_t>(args.part_sums, items, K * C, sums.data_ptr<acc_t>());
    reduce_items<acc_t>(args.part_tot, items, K, totals.data_ptr<acc_t>());
  });
  return {sums, totals};
}

std::tuple<at::Tensor, at::Tensor> probs_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& grad_totals,
                                                      const at::Tensor& features, const at::Tensor& probs,
                                                      bool need_features_grad, bool need_probs_grad) {
  check_prototype_probs_inputs(features, probs);
  const int64_t K = probs.size(1);
  check_prototype_grads(grad_sums, grad_totals, features, K);
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2);
  at::Tensor gf = need_features_grad ? at::empty_like(features) : features.new_empty({0});
  at::Tensor gp = need_probs_grad ? at::empty_like(probs) : probs.new_empty({0});
  if (B == 0 || N == 0 || (!need_features_grad && !need_probs_grad)) return {gf, gp};
  const Partition part = partition_tokens(B, N, kTileProbs);
  const int64_t items = B * part.splits;
  auto G = grad_sums.contiguous();
  auto gt = grad_totals.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_probs_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    ProbsBackward<scalar_t> args{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        probs.data_ptr<scalar_t>(), probs.stride(0), probs.stride(1), probs.stride(2),
        G.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
        need_features_grad ? gf.data_ptr<scalar_t>() : nullptr,
        need_features_grad ? gf.stride(0) : 0, need_features_grad ? gf.stride(1) : 0,
        need_features_grad ? gf.stride(2) : 0,
        need_probs_grad ? gp.data_ptr<scalar_t>() : nullptr,
        need_probs_grad ? gp.stride(0) : 0, need_probs_grad ? gp.stride(1) : 0,
        need_probs_grad ? gp.stride(2) : 0,
        N, C, K, part};
    run_items(items, B * N * C, [&](int64_t i) { probs_backward_item(args, i / part.splits, i % part.splits); });
  });
  return {gf, gp};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_kernels, CPU, m) {
  m.impl("_prototype_update_labels_forward", &labels_forward_cpu);
  m.impl("_prototype_update_labels_backward", &labels_backward_cpu);
  m.impl("_prototype_update_probs_forward", &probs_forward_cpu);
  m.impl("_prototype_update_probs_backward", &probs_backward_cpu);
}

}  // namespace cpu
}  // namespace icl_kernels
