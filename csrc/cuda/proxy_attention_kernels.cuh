// CUDA kernels of the fused proxy attention and the host code that launches
// them.
//
// The host part is written against a small "launcher" interface (prepare /
// resident_blocks / launch) so that the very same code runs on a GPU
// (proxy_attention.cu) and, on machines without one, through the CPU
// emulation of the CUDA execution model in tests/cuda_emu/ (which defines
// ICL_CUDA_EMULATION before including this file).
//
// Layout of the work (see csrc/cpu/proxy_attention.cpp for the same
// algorithm on the CPU):
//   * tokens are processed in tiles of T (32; 16 for float64) held in shared
//     memory as xhat (normalised on the fly), padded channels kept zero;
//   * rows of A are owned by warps (row r of a chunk -> warp r % 8), each
//     lane owning channels lane + 32 j: the rows of A / dZ and the Z and dA
//     accumulators of a warp live in registers;
//   * a logit A[m] . xhat[t] is a lane-partial dot product followed by a
//     warp "transpose reduction" that sums V tokens' partials at once;
//   * the forward splits N over blocks (batch x token split x row chunk);
//     each block writes its part of S and a partial softmax state, combined
//     in a fixed order by a second kernel;
//   * the backward gives each block (batch x token split) every row, so
//     it finishes dxhat and dx for its tokens; dA and dc go to per-block
//     partials summed in a fixed order by a last kernel.
// Nothing uses atomics: every result is bitwise reproducible for a given
// device (the token partition depends on the shapes and the SM count).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../proxy_attention.h"
#include "../proxy_attention_math.h"

#ifdef ICL_CUDA_EMULATION
#define ICL_DYNAMIC_SMEM(name) unsigned char* name = ::icl_emu::dynamic_smem()
#else
#define ICL_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#define ICL_DEVICE __device__ __forceinline__

namespace icl_kernels {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
// Widest token supported (C <= 32 x the largest channel-group count, 16).  Bounded by the
// registers per lane (CJ values per row) and the backward's shared memory.
constexpr int kMaxChannels = 512;
// A token split holds at least this many tokens (a couple of tiles).
constexpr int64_t kMinSplitTokens = 64;
// Upper bound (elements) of the per-split partial buffers of Z / dA; more
// splits than this allows are not worth the extra memory.
constexpr int64_t kPartialBudget = int64_t(1) << 23;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Tokens per tile: one per lane for float accumulation; 16 for float64 so that
// the backward's tiles of C = 512 fit an H100 block's shared memory.
template <typename acc_t>
constexpr int tile_tokens() {
  return sizeof(acc_t) == 8 ? 16 : 32;
}

// Rows of A per warp for CJ channel groups of 32: RI * CJ = 16 register values
// per row set, so that A, Z (forward) or A, dZ, dA (backward) stay in registers.
template <int CJ>
constexpr int rows_per_warp() {
  return CJ >= 16 ? 1 : 16 / CJ;
}

// Blocks per SM the tile kernels are compiled for (caps registers at 128 per
// thread for float accumulation; float64 needs twice the registers).
template <typename acc_t>
constexpr int kMinBlocks = sizeof(acc_t) == 8 ? 1 : 2;

constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int clog2(int v) { return v <= 1 ? 0 : 1 + clog2(v / 2); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------
// Warp-level building blocks
// ---------------------------------------------------------------------------

template <typename T>
ICL_DEVICE T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
ICL_DEVICE T warp_max(T v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const T w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// One halving step of warp_transpose_reduce: lanes whose bit o is set keep the
// upper half of the K values, the others the lower half, and each adds the half
// its partner kept.  Compile-time recursion, so that every index is a constant
// and the array stays in registers.
template <int K, int V, typename T>
ICL_DEVICE void transpose_reduce_steps(T (&val)[V], int lane) {
  if constexpr (K > 1) {
    constexpr int half = K / 2;
    constexpr int o = 16 * K / V;
    const bool upper = (lane & o) != 0;
#pragma unroll
    for (int u = 0; u < half; ++u) {
      const T send = upper ? val[u] : val[u + half];
      const T keep = upper ? val[u + half] : val[u];
      val[u] = keep + __shfl_xor_sync(kFullMask, send, o);
    }
    transpose_reduce_steps<half, V>(val, lane);
  }
}

// Sums each of the V values across the 32 lanes of a warp with V - 1 + log2(32/V)
// shuffles instead of 5 V: a butterfly that halves the array at each step
// (reduce-scatter), then an all-reduce over the remaining lane bits.  On return
// lane L holds the total of val[L / (32 / V)].  The addition tree of every total
// is the same as that of warp_sum, so results do not depend on V.
template <int V, typename T>
ICL_DEVICE T warp_transpose_reduce(T (&val)[V], int lane) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two <= 32");
  transpose_reduce_steps<V, V>(val, lane);
  T r = val[0];
#pragma unroll
  for (int o = 16 / V; o >= 1; o >>= 1) r += __shfl_xor_sync(kFullMask, r, o);
  return r;
}

// ---------------------------------------------------------------------------
// Token tiles
// ---------------------------------------------------------------------------

// Copies the T tokens starting at xb (token stride sn, channel stride sc) into
// Xs[t * ldx + c] as acc_t; tokens t >= tv are written as zeros so that they add
// nothing anywhere.  Channels c >= C of Xs are never written (kept zero).
// Loads are issued in batches of kLoadBatch per thread before their stores, so
// that a thread has that many global reads in flight instead of one.
constexpr int kLoadBatch = 16;

template <typename scalar_t, typename acc_t, int T, int CJ>
ICL_DEVICE void load_tile(const scalar_t* __restrict__ xb, int64_t sn, int64_t sc, int tv, int C,
                          int ldx, acc_t* Xs) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (sc == 1 || sn != 1) {
    // Channels contiguous (or general strides): a warp reads tokens warp + 8 k,
    // lane l channels l + 32 j (C <= 32 CJ).
    constexpr int TW = T / kWarps;                               // tokens per warp
    constexpr int KB = CJ >= kLoadBatch ? 1 : cmin(TW, kLoadBatch / CJ);  // tokens per batch
#pragma unroll
    for (int k0 = 0; k0 < TW; k0 += KB) {
      acc_t v[KB][CJ];
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        const int t = warp + kWarps * (k0 + k);
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
          const int c = lane + kWarpSize * j;
          v[k][j] = (t < tv && c < C) ? static_cast<acc_t>(xb[t * sn + c * sc]) : acc_t(0);
        }
      }
#pragma unroll
      for (int k = 0; k < KB; ++k) {
        const int t = warp + kWarps * (k0 + k);
#pragma unroll
        for (int j = 0; j < CJ; ++j) {
          const int c = lane + kWarpSize * j;
          if (c < C) Xs[t * ldx + c] = v[k][j];
        }
      }
    }
  } else {
    // Tokens contiguous ([B, C, N] maps): lane l reads token l of channels warp + 8 k.
#pragma unroll 1
    for (int c0 = warp; c0 < C; c0 += kWarps * kLoadBatch) {
      acc_t v[kLoadBatch];
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int c = c0 + kWarps * k;
        v[k] = (lane < tv && c < C) ? static_cast<acc_t>(xb[lane + c * sc]) : acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int c = c0 + kWarps * k;
        if (lane < T && c < C) Xs[lane * ldx + c] = v[k];
      }
    }
  }
}

// In-place LayerNorm (no affine) of the tv valid tokens of a tile; a warp per
// token, two-pass statistics (mean, then squared deviations).
template <typename acc_t, int T>
ICL_DEVICE void normalize_tile(acc_t* Xs, acc_t* rstd_s, int tv, int C, int ldx, acc_t eps) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int t = warp; t < tv; t += kWarps) {
    acc_t* row = Xs + t * ldx;
    acc_t s = 0;
    for (int c = lane; c < C; c += kWarpSize) s += row[c];
    const acc_t mean = warp_sum(s) / acc_t(C);
    acc_t q = 0;
    for (int c = lane; c < C; c += kWarpSize) {
      const acc_t d = row[c] - mean;
      q += d * d;
    }
    const acc_t r = token_rstd<acc_t>(warp_sum(q), C, eps);
    for (int c = lane; c < C; c += kWarpSize) row[c] = (row[c] - mean) * r;
    if (lane == 0) rstd_s[t] = r;
  }
}

// out[i][t] = R[i] . Xs[t] for the RI rows held by this warp (R[i][j] is the
// value of channel lane + 32 j) and the T tokens of the tile; the results go to
// out[i * T + t] (shared memory, per warp), written by one lane each.
template <typename acc_t, int T, int RI, int CJ, int V>
ICL_DEVICE void warp_row_dots(const acc_t* Xs, int ldx, int cj, const acc_t (&R)[RI][CJ],
                              const bool (&row_ok)[RI], acc_t* out, int lane) {
  constexpr int kRep = kWarpSize / V;  // lanes holding each total
#pragma unroll 1
  for (int q = 0; q < T / V; ++q) {
    acc_t part[RI][V];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int v = 0; v < V; ++v) part[i][v] = 0;
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      if (j < cj) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t xv = Xs[(q * V + v) * ldx + lane + kWarpSize * j];
#pragma unroll
          for (int i = 0; i < RI; ++i)
            if (row_ok[i]) part[i][v] += R[i][j] * xv;  // rows past M: no work
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      if (row_ok[i]) {  // warp-uniform
        const acc_t r = warp_transpose_reduce<V>(part[i], lane);
        if (lane % kRep == 0) out[i * T + q * V + lane / kRep] = r;
      }
    }
  }
}

// Two dot products per (row, token) at once: out1 = R1 . xhat, out2 = R2 . xhat.
template <typename acc_t, int T, int RI, int CJ, int V>
ICL_DEVICE void warp_row_dots2(const acc_t* Xs, int ldx, int cj, const acc_t (&R1)[RI][CJ],
                               const acc_t (&R2)[RI][CJ], const bool (&row_ok)[RI], acc_t* out1,
                               acc_t* out2, int out_ld, int lane) {
  constexpr int kRep = kWarpSize / V;
#pragma unroll 1
  for (int q = 0; q < T / V; ++q) {
    acc_t p1[RI][V], p2[RI][V];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int v = 0; v < V; ++v) p1[i][v] = p2[i][v] = 0;
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      if (j < cj) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t xv = Xs[(q * V + v) * ldx + lane + kWarpSize * j];
#pragma unroll
          for (int i = 0; i < RI; ++i) {
            if (row_ok[i]) {  // rows past M: no work
              p1[i][v] += R1[i][j] * xv;
              p2[i][v] += R2[i][j] * xv;
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      if (row_ok[i]) {  // warp-uniform
        const acc_t r1 = warp_transpose_reduce<V>(p1[i], lane);
        const acc_t r2 = warp_transpose_reduce<V>(p2[i], lane);
        if (lane % kRep == 0) {
          out1[i * out_ld + q * V + lane / kRep] = r1;
          out2[i * out_ld + q * V + lane / kRep] = r2;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct ForwardParams {
  const scalar_t* x;
  int64_t sxb, sxn, sxc;
  const acc_t* A;      // [B, M, C] contiguous
  const acc_t* cb;     // [B, M]
  scalar_t* S;         // [B, M, N]
  acc_t* part_max;     // [B, splits, M]
  acc_t* part_sum;     // [B, splits, M]
  acc_t* part_z;       // [B, splits, M, C]
  int64_t N;
  int C, M;
  int64_t splits, split_len;
  int m_chunks, ldx;
  bool has_eps;
  acc_t eps;
};

template <typename acc_t, int CJ>
inline size_t forward_smem_bytes(int ldx) {
  constexpr int T = tile_tokens<acc_t>();
  constexpr int RI = rows_per_warp<CJ>();
  return (static_cast<size_t>(T) * ldx + T + kWarps * RI * T) * sizeof(acc_t);
}

// One block per (batch b, token split s, row chunk): S for its rows and tokens,
// and the softmax state (max, sum, unnormalised Z) of its rows over its tokens.
template <typename scalar_t, typename acc_t, int CJ>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t>)
    proxy_attention_forward_partial_kernel(const ForwardParams<scalar_t, acc_t> p) {
  constexpr int T = tile_tokens<acc_t>();
  constexpr int RI = rows_per_warp<CJ>();
  // Tokens per transpose reduction: 16 costs as many shuffles per logit as 32
  // (16 per 16 against 31 per 32) with half the partial sums in registers.
  constexpr int V = cmin(T, cmin(16, kWarpSize / RI));
  ICL_DYNAMIC_SMEM(smem_raw);
  acc_t* Xs = reinterpret_cast<acc_t*>(smem_raw);  // [T][ldx]
  acc_t* rstd_s = Xs + T * p.ldx;                    // [T]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  acc_t* buf = rstd_s + T + warp * RI * T;  // this warp's [RI][T]: logits, then weights

  const int64_t blk = blockIdx.x;
  const int mc = static_cast<int>(blk % p.m_chunks);
  const int64_t bs = blk / p.m_chunks;
  const int64_t s = bs % p.splits, b = bs / p.splits;
  const int64_t n_begin = s * p.split_len;
  const int64_t n_end = n_begin + p.split_len < p.N ? n_begin + p.split_len : p.N;
  const int C = p.C, M = p.M, ldx = p.ldx;
  const int cj = (C + kWarpSize - 1) / kWarpSize;

  int row_m[RI];
  bool row_ok[RI];
  acc_t a[RI][CJ], z[RI][CJ], bias[RI], run_max[RI], lsum[RI];
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    row_m[i] = mc * (kWarps * RI) + i * kWarps + warp;
    row_ok[i] = row_m[i] < M;
    const int64_t r = b * M + row_m[i];
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      const int c = lane + kWarpSize * j;
      a[i][j] = (row_ok[i] && c < C) ? p.A[r * C + c] : acc_t(0);
      z[i][j] = 0;
    }
    bias[i] = row_ok[i] ? p.cb[r] : acc_t(0);
    run_max[i] = neg_infinity<acc_t>();
    lsum[i] = 0;
  }
  // Padded channels of the tile must read as zeros.
  for (int k = threadIdx.x; k < T * ldx; k += kThreads) Xs[k] = 0;

  const scalar_t* xb = p.x + b * p.sxb;
#pragma unroll 1
  for (int64_t n0 = n_begin; n0 < n_end; n0 += T) {
    const int tv = static_cast<int>(n_end - n0 < T ? n_end - n0 : T);
    __syncthreads();  // every warp is done with the previous tile
    load_tile<scalar_t, acc_t, T, CJ>(xb + n0 * p.sxn, p.sxn, p.sxc, tv, C, ldx, Xs);
    __syncthreads();
    if (p.has_eps) {
      normalize_tile<acc_t, T>(Xs, rstd_s, tv, C, ldx, p.eps);
      __syncthreads();
    }
    warp_row_dots<acc_t, T, RI, CJ, V>(Xs, ldx, cj, a, row_ok, buf, lane);
    __syncwarp();
    // Logits out, online softmax: lane t handles token t of each row.
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      if (!row_ok[i]) continue;  // warp-uniform
      acc_t sv = neg_infinity<acc_t>();
      if (lane < tv) {
        sv = buf[i * T + lane] + bias[i];
        p.S[(b * M + row_m[i]) * p.N + n0 + lane] = static_cast<scalar_t>(sv);
      }
      const acc_t tile_max = warp_max(sv);
      const acc_t new_max = tile_max > run_max[i] ? tile_max : run_max[i];
      const acc_t alpha = rescale_factor(run_max[i], new_max);
      const acc_t pv = lane < tv ? std::exp(sv - new_max) : acc_t(0);
      lsum[i] = lsum[i] * alpha + pv;
      run_max[i] = new_max;
      if (alpha != acc_t(1)) {  // warp-uniform
#pragma unroll
        for (int j = 0; j < CJ; ++j) z[i][j] *= alpha;
      }
      if (lane < T) buf[i * T + lane] = pv;
    }
    __syncwarp();
    // z[i] += sum_t P[i][t] xhat[t]
#pragma unroll 2
    for (int t = 0; t < tv; ++t) {
      acc_t xv[CJ];
#pragma unroll
      for (int j = 0; j < CJ; ++j) xv[j] = j < cj ? Xs[t * ldx + lane + kWarpSize * j] : acc_t(0);
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        if (!row_ok[i]) continue;
        const acc_t pv = buf[i * T + t];
#pragma unroll
        for (int j = 0; j < CJ; ++j) z[i][j] += pv * xv[j];
      }
    }
  }

  const int64_t item = b * p.splits + s;
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    if (!row_ok[i]) continue;
    const acc_t total = warp_sum(lsum[i]);
    const int64_t k = item * M + row_m[i];
    if (lane == 0) {
      p.part_max[k] = run_max[i];
      p.part_sum[k] = total;
    }
#pragma unroll
    for (int j = 0; j < CJ; ++j) {
      const int c = lane + kWarpSize * j;
      if (c < C) p.part_z[k * C + c] = z[i][j];
    }
  }
}

template <typename scalar_t, typename acc_t>
struct CombineParams {
  const acc_t* part_max;
  const acc_t* part_sum;
  const acc_t* part_z;
  scalar_t* Z;   // [B, M, C]
  acc_t* lse;    // [B, M]
  int64_t B, splits;
  int M, C;
};

// A warp per (batch, row, group of 32 channels): merges the token splits in
// increasing order (the order fixes the rounding), writes Z and lse.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    proxy_attention_forward_combine_kernel(const CombineParams<scalar_t, acc_t> p) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t groups = (p.C + kWarpSize - 1) / kWarpSize;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (gw >= p.B * p.M * groups) return;  // no collective operation below
  const int64_t row = gw / groups;
  const int c = static_cast<int>(gw % groups) * kWarpSize + lane;
  const int64_t b = row / p.M, m = row % p.M;
  SoftmaxState<acc_t> st{neg_infinity<acc_t>(), acc_t(0)};
  acc_t zacc = 0;
#pragma unroll 4
  for (int64_t s = 0; s < p.splits; ++s) {
    const int64_t k = (b * p.splits + s) * p.M + m;
    acc_t fa, fb;
    st = merge_softmax_states<acc_t>(st, SoftmaxState<acc_t>{p.part_max[k], p.part_sum[k]}, &fa,
                                     &fb);
    if (c < p.C) zacc = zacc * fa + p.part_z[k * p.C + c] * fb;
  }
  const acc_t inv = acc_t(1) / st.sum;
  if (c < p.C) p.Z[row * p.C + c] = static_cast<scalar_t>(zacc * inv);
  if (c == 0) p.lse[row] = log_sum_exp(st);
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BackwardParams {
  const scalar_t* x;
  int64_t sxb, sxn, sxc;
  scalar_t* dx;
  int64_t sdb, sdn, sdc;
  const acc_t* A;      // [B, M, C]
  const acc_t* cb;     // [B, M]
  const acc_t* dZ;     // [B, M, C] (zeros when grad_Z is absent)
  const acc_t* D;      // [B, M] = dZ . Z
  const acc_t* lse;    // [B, M]
  const scalar_t* gS;  // grad_S [B, M, N] (any strides) or null
  int64_t sgb, sgm, sgn;
  acc_t* part_dA;      // [B, splits, M, C]
  acc_t* part_dc;      // [B, splits, M]
  int64_t N;
  int C, M;
  int64_t splits, split_len;
  int m_chunks, ldx;
  bool has_eps;
  acc_t eps;
};

template <typename acc_t, int CJ>
inline size_t backward_smem_bytes(int ldx) {
  constexpr int T = tile_tokens<acc_t>();
  constexpr int Mc = kWarps * rows_per_warp<CJ>();
  return (static_cast<size_t>(2 * T + 2 * Mc) * ldx + 2 * Mc * T + T) * sizeof(acc_t);
}

// One block per (batch b, token split s); every row of A meets every tile, in
// chunks of Mc rows, so that dxhat and dx of the tile are complete in the block.
template <typename scalar_t, typename acc_t, int CJ>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t>)
    proxy_attention_backward_kernel(const BackwardParams<scalar_t, acc_t> p) {
  constexpr int T = tile_tokens<acc_t>();
  constexpr int RI = rows_per_warp<CJ>();
  constexpr int Mc = kWarps * RI;
  constexpr int V = cmin(T, 16 / RI);  // two partial arrays of RI x V
  constexpr int TK = T / kWarps;       // tokens per warp in the dxhat product
  constexpr int JB = 4;                // channel groups per pass of the dxhat product
  const int C = p.C, M = p.M, ldx = p.ldx;
  const int cj = (C + kWarpSize - 1) / kWarpSize;
  ICL_DYNAMIC_SMEM(smem_raw);
  acc_t* Xs = reinterpret_cast<acc_t*>(smem_raw);  // [T][ldx]  xhat
  acc_t* dXs = Xs + T * ldx;                         // [T][ldx]  dxhat
  acc_t* As = dXs + T * ldx;                         // [Mc][ldx] A of the chunk
  acc_t* dZs = As + Mc * ldx;                        // [Mc][ldx] dZ of the chunk
  acc_t* DSs = dZs + Mc * ldx;                       // [Mc][T]   logits, then dS
  acc_t* Ps = DSs + Mc * T;                          // [Mc][T]   dP, then P
  acc_t* rstd_s = Ps + Mc * T;                       // [T]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  const int64_t s = blockIdx.x % p.splits, b = blockIdx.x / p.splits;
  const int64_t n_begin = s * p.split_len;
  const int64_t n_end = n_begin + p.split_len < p.N ? n_begin + p.split_len : p.N;
  const bool single_chunk = p.m_chunks == 1;
  const int64_t item = b * p.splits + s;

  int row_m[RI];
  bool row_ok[RI];
  acc_t a[RI][CJ], dz[RI][CJ], dA[RI][CJ], bias[RI], lse[RI], Dr[RI], dc_lane[RI];
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    row_m[i] = 0;
    row_ok[i] = false;
    dc_lane[i] = 0;
#pragma unroll
    for (int j = 0; j < CJ; ++j) dA[i][j] = 0;
  }

  // Rows [mc * Mc, mc * Mc + Mc) into shared memory (zeros past M and C) and
  // this warp's rows into registers.  The caller synchronises.
  auto load_chunk = [&](int mc) {
    const int m0 = mc * Mc;
    for (int k = threadIdx.x; k < Mc * ldx; k += kThreads) {
      const int r = k / ldx, c = k - r * ldx;
      const bool ok = m0 + r < M && c < C;
      const int64_t g = (b * M + m0 + r) * C + c;
      As[k] = ok ? p.A[g] : acc_t(0);
      dZs[k] = ok ? p.dZ[g] : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      row_m[i] = m0 + i * kWarps + warp;
      row_ok[i] = row_m[i] < M;
      const int64_t r = b * M + row_m[i];
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        const int c = lane + kWarpSize * j;
        const bool ok = row_ok[i] && c < C;
        a[i][j] = ok ? p.A[r * C + c] : acc_t(0);
        dz[i][j] = ok ? p.dZ[r * C + c] : acc_t(0);
      }
      bias[i] = row_ok[i] ? p.cb[r] : acc_t(0);
      lse[i] = row_ok[i] ? p.lse[r] : acc_t(0);
      Dr[i] = row_ok[i] ? p.D[r] : acc_t(0);
    }
  };

  // Adds (or, for the first tile, stores) this warp's dA / dc to the block's partials.
  auto flush_partials = [&](bool store) {
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      if (!row_ok[i]) continue;  // warp-uniform
      const int64_t k = item * M + row_m[i];
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        const int c = lane + kWarpSize * j;
        if (c < C) {
          acc_t* dst = p.part_dA + k * C + c;
          *dst = store ? dA[i][j] : *dst + dA[i][j];
        }
        dA[i][j] = 0;
      }
      const acc_t total = warp_sum(dc_lane[i]);
      if (lane == 0) p.part_dc[k] = store ? total : p.part_dc[k] + total;
      dc_lane[i] = 0;
    }
  };

  for (int k = threadIdx.x; k < T * ldx; k += kThreads) Xs[k] = 0;  // padded channels
  if (single_chunk) load_chunk(0);

  const bool dx_direct = p.sdc == 1 || p.sdn != 1;  // else stage dx for a token-major write
  const scalar_t* xb = p.x + b * p.sxb;
  bool first_tile = true;
#pragma unroll 1
  for (int64_t n0 = n_begin; n0 < n_end; n0 += T) {
    const int tv = static_cast<int>(n_end - n0 < T ? n_end - n0 : T);
    __syncthreads();  // the previous tile is finished (Xs, dXs, DSs, Ps free)
    load_tile<scalar_t, acc_t, T, CJ>(xb + n0 * p.sxn, p.sxn, p.sxc, tv, C, ldx, Xs);
    __syncthreads();
    if (p.has_eps) {
      normalize_tile<acc_t, T>(Xs, rstd_s, tv, C, ldx, p.eps);
      __syncthreads();
    }
#pragma unroll 1
    for (int mc = 0; mc < p.m_chunks; ++mc) {
      if (!single_chunk) {
        if (mc > 0) __syncthreads();  // the previous chunk's dxhat product is done
        load_chunk(mc);
        __syncthreads();
      }
      const int rows = M - mc * Mc < Mc ? M - mc * Mc : Mc;
      // Logits (into DSs) and dP = dZ . xhat (into Ps) for this warp's rows.
      warp_row_dots2<acc_t, T, RI, CJ, V>(Xs, ldx, cj, a, dz, row_ok, DSs + warp * T,
                                          Ps + warp * T, kWarps * T, lane);
      __syncwarp();
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        if (!row_ok[i] || lane >= T) continue;
        const int idx = (i * kWarps + warp) * T + lane;
        acc_t ds = 0, pv = 0;
        if (lane < tv) {
          pv = std::exp(DSs[idx] + bias[i] - lse[i]);
          const acc_t g = p.gS ? static_cast<acc_t>(p.gS[b * p.sgb + row_m[i] * p.sgm +
                                                         (n0 + lane) * p.sgn])
                               : acc_t(0);
          ds = logit_grad<acc_t>(g, pv, Ps[idx], Dr[i]);
        }
        DSs[idx] = ds;
        Ps[idx] = pv;
        dc_lane[i] += ds;
      }
      __syncwarp();
      // dA[i] += sum_t dS[i][t] xhat[t]
#pragma unroll 2
      for (int t = 0; t < tv; ++t) {
        acc_t xv[CJ];
#pragma unroll
        for (int j = 0; j < CJ; ++j) xv[j] = j < cj ? Xs[t * ldx + lane + kWarpSize * j] : acc_t(0);
#pragma unroll
        for (int i = 0; i < RI; ++i) {
          if (!row_ok[i]) continue;
          const acc_t dsv = DSs[(i * kWarps + warp) * T + t];
#pragma unroll
          for (int j = 0; j < CJ; ++j) dA[i][j] += dsv * xv[j];
        }
      }
      __syncthreads();  // dS and P of every row of the chunk are in shared memory
      // dxhat[t] (+)= sum_r dS[r][t] A[r] + P[r][t] dZ[r]; warp w owns tokens w + 8 k.
#pragma unroll 1
      for (int jb = 0; jb < cj; jb += JB) {
        acc_t acc[TK][JB];
#pragma unroll
        for (int k = 0; k < TK; ++k)
#pragma unroll
          for (int jj = 0; jj < JB; ++jj) {
            const int t = warp + kWarps * k, c = lane + kWarpSize * (jb + jj);
            acc[k][jj] = (mc == 0 || jb + jj >= cj) ? acc_t(0) : dXs[t * ldx + c];
          }
#pragma unroll 2
        for (int r = 0; r < rows; ++r) {
          acc_t dsv[TK], pv[TK];
#pragma unroll
          for (int k = 0; k < TK; ++k) {
            dsv[k] = DSs[r * T + warp + kWarps * k];
            pv[k] = Ps[r * T + warp + kWarps * k];
          }
#pragma unroll
          for (int jj = 0; jj < JB; ++jj) {
            if (jb + jj < cj) {
              const int c = lane + kWarpSize * (jb + jj);
              const acc_t av = As[r * ldx + c], zv = dZs[r * ldx + c];
#pragma unroll
              for (int k = 0; k < TK; ++k) acc[k][jj] += dsv[k] * av + pv[k] * zv;
            }
          }
        }
#pragma unroll
        for (int k = 0; k < TK; ++k)
#pragma unroll
          for (int jj = 0; jj < JB; ++jj)
            if (jb + jj < cj)
              dXs[(warp + kWarps * k) * ldx + lane + kWarpSize * (jb + jj)] = acc[k][jj];
      }
      if (!single_chunk) flush_partials(first_tile);
    }
    // LayerNorm backward of this warp's tokens (it wrote their whole dxhat rows).
#pragma unroll
    for (int k = 0; k < TK; ++k) {
      const int t = warp + kWarps * k;
      if (t >= tv) continue;  // warp-uniform
      acc_t* drow = dXs + t * ldx;
      const acc_t* xrow = Xs + t * ldx;
      acc_t mean1 = 0, mean2 = 0, r = 1;
      if (p.has_eps) {
        acc_t s1 = 0, s2 = 0;
        for (int c = lane; c < C; c += kWarpSize) {
          s1 += drow[c];
          s2 += drow[c] * xrow[c];
        }
        mean1 = warp_sum(s1) / acc_t(C);
        mean2 = warp_sum(s2) / acc_t(C);
        r = rstd_s[t];
      }
      scalar_t* out = p.dx + b * p.sdb + (n0 + t) * p.sdn;
      for (int c = lane; c < C; c += kWarpSize) {
        const acc_t v =
            p.has_eps ? layer_norm_input_grad<acc_t>(drow[c], xrow[c], r, mean1, mean2) : drow[c];
        if (dx_direct)
          out[c * p.sdc] = static_cast<scalar_t>(v);
        else
          drow[c] = v;
      }
    }
    if (!dx_direct) {  // token-major dx ([B, C, N] layout): write along tokens
      __syncthreads();
      scalar_t* out = p.dx + b * p.sdb + n0 * p.sdn;
      for (int c = warp; c < C; c += kWarps)
        if (lane < tv) out[lane * p.sdn + c * p.sdc] = static_cast<scalar_t>(dXs[lane * ldx + c]);
    }
    first_tile = false;
  }
  if (single_chunk) flush_partials(true);
}

template <typename scalar_t, typename acc_t>
struct ReduceParams {
  const acc_t* part;  // [B, splits, inner]
  scalar_t* out;      // [B, inner]
  int64_t B, splits, inner;
};

// out[b, k] = sum over splits s (in increasing order) of part[b, s, k].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    proxy_attention_reduce_splits_kernel(const ReduceParams<scalar_t, acc_t> p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.B * p.inner) return;
  const int64_t b = idx / p.inner, k = idx % p.inner;
  const acc_t* src = p.part + b * p.splits * p.inner + k;
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t s = 0; s < p.splits; ++s) sum += src[s * p.inner];
  p.out[idx] = static_cast<scalar_t>(sum);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

struct Partition {
  int64_t splits;
  int64_t split_len;  // a multiple of the tile
};

// Token ranges per batch element: enough blocks for about target_blocks
// (units = blocks per token range), ranges of at least kMinSplitTokens, and
// partial buffers (partial_elems per range) within kPartialBudget.
inline Partition partition_tokens(int64_t N, int64_t units, int64_t target_blocks,
                                  int64_t partial_elems, int64_t tile) {
  int64_t want = ceil_div(std::max<int64_t>(target_blocks, 1), std::max<int64_t>(units, 1));
  want = std::min(want, ceil_div(N, kMinSplitTokens));
  want = std::min(want, std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(partial_elems, 1)));
  want = std::max<int64_t>(want, 1);
  const int64_t len = round_up(ceil_div(N, want), tile);
  return Partition{ceil_div(N, len), len};
}

// Calls f(std::integral_constant<int, CJ>) with the channel-group count of the
// kernel instance that covers C channels.
template <typename F>
void dispatch_channel_groups(int64_t C, F&& f) {
  TORCH_CHECK_VALUE(C <= kMaxChannels, "proxy_attention (cuda backend): supports C <= ",
                    kMaxChannels, " channels, got C=", C,
                    "; use backend='triton' or backend='torch' for wider tokens");
  if (C <= 128)
    f(std::integral_constant<int, 4>());
  else if (C <= 256)
    f(std::integral_constant<int, 8>());
  else
    f(std::integral_constant<int, 16>());
}

inline int tile_ld(int64_t C) {
  // Odd leading dimension: the token-major load writes a column of the tile
  // without shared memory bank conflicts.
  return static_cast<int>(round_up(C, kWarpSize) + 1);
}

// Launcher interface (see proxy_attention.cu and tests/cuda_emu/):
//   void prepare(kernel, smem_bytes): allow / check that much dynamic shared memory
//   int64_t resident_blocks(kernel, smem_bytes): blocks the device runs at once
//   void launch(kernel, grid, threads, smem_bytes, params)
// The kernels are instantiated in function templates, not in the dispatch
// lambdas: nvcc's host stubs cannot name a lambda's local scalar_t alias.

template <typename scalar_t, int CJ, typename Launcher>
void launch_forward(const at::Tensor& x, const at::Tensor& A_in, const at::Tensor& c_in,
                    std::optional<double> eps, const at::Tensor& Z, const at::Tensor& S,
                    const at::Tensor& lse, Launcher& launcher) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int T = tile_tokens<acc_t>();
  constexpr int Mc = kWarps * rows_per_warp<CJ>();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A_in.size(1);
  const int ldx = tile_ld(C);
  const int m_chunks = static_cast<int>(ceil_div(M, Mc));
  const size_t smem = forward_smem_bytes<acc_t, CJ>(ldx);
  auto kernel = &proxy_attention_forward_partial_kernel<scalar_t, acc_t, CJ>;
  launcher.prepare(kernel, smem);
  const Partition part =
      partition_tokens(N, B * m_chunks, 2 * launcher.resident_blocks(kernel, smem), B * M * C, T);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_opts = x.options().dtype(acc);
  at::Tensor A = A_in.to(acc).contiguous();
  at::Tensor cb = c_in.to(acc).contiguous();
  at::Tensor part_max = at::empty({B, part.splits, M}, acc_opts);
  at::Tensor part_sum = at::empty({B, part.splits, M}, acc_opts);
  at::Tensor part_z = at::empty({B, part.splits, M, C}, acc_opts);
  ForwardParams<scalar_t, acc_t> fp{};
  fp.x = x.data_ptr<scalar_t>();
  fp.sxb = x.stride(0);
  fp.sxn = x.stride(1);
  fp.sxc = x.stride(2);
  fp.A = A.data_ptr<acc_t>();
  fp.cb = cb.data_ptr<acc_t>();
  fp.S = S.data_ptr<scalar_t>();
  fp.part_max = part_max.data_ptr<acc_t>();
  fp.part_sum = part_sum.data_ptr<acc_t>();
  fp.part_z = part_z.data_ptr<acc_t>();
  fp.N = N;
  fp.C = static_cast<int>(C);
  fp.M = static_cast<int>(M);
  fp.splits = part.splits;
  fp.split_len = part.split_len;
  fp.m_chunks = m_chunks;
  fp.ldx = ldx;
  fp.has_eps = eps.has_value();
  fp.eps = static_cast<acc_t>(eps.value_or(0.0));
  launcher.launch(kernel, B * part.splits * m_chunks, kThreads, smem, fp);

  CombineParams<scalar_t, acc_t> cp{};
  cp.part_max = fp.part_max;
  cp.part_sum = fp.part_sum;
  cp.part_z = fp.part_z;
  cp.Z = Z.data_ptr<scalar_t>();
  cp.lse = lse.data_ptr<acc_t>();
  cp.B = B;
  cp.splits = part.splits;
  cp.M = static_cast<int>(M);
  cp.C = static_cast<int>(C);
  const int64_t warps = B * M * ceil_div(C, kWarpSize);
  launcher.launch(&proxy_attention_forward_combine_kernel<scalar_t, acc_t>, ceil_div(warps, kWarps),
                  kThreads, 0, cp);
}

template <typename scalar_t, int CJ, typename Launcher>
void launch_backward(const std::optional<at::Tensor>& grad_Z,
                     const std::optional<at::Tensor>& grad_S, const at::Tensor& x,
                     const at::Tensor& A_in, const at::Tensor& c_in, const at::Tensor& Z,
                     const at::Tensor& lse_in, std::optional<double> eps, const at::Tensor& dx,
                     const at::Tensor& dA, const at::Tensor& dc, Launcher& launcher) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int T = tile_tokens<acc_t>();
  constexpr int Mc = kWarps * rows_per_warp<CJ>();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A_in.size(1);
  const int ldx = tile_ld(C);
  const int m_chunks = static_cast<int>(ceil_div(M, Mc));
  const size_t smem = backward_smem_bytes<acc_t, CJ>(ldx);
  auto kernel = &proxy_attention_backward_kernel<scalar_t, acc_t, CJ>;
  launcher.prepare(kernel, smem);
  const Partition part =
      partition_tokens(N, B, 2 * launcher.resident_blocks(kernel, smem), B * M * C, T);
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_opts = x.options().dtype(acc);
  at::Tensor A = A_in.to(acc).contiguous();
  at::Tensor cb = c_in.to(acc).contiguous();
  at::Tensor lse = lse_in.contiguous();
  at::Tensor dZ, D;
  if (grad_Z.has_value()) {
    dZ = grad_Z->to(acc).contiguous();
    D = (dZ * Z.to(acc)).sum(-1).contiguous();  // the softmax backward's row constant
  } else {
    dZ = at::zeros({B, M, C}, acc_opts);
    D = at::zeros({B, M}, acc_opts);
  }
  at::Tensor part_dA = at::empty({B, part.splits, M, C}, acc_opts);
  at::Tensor part_dc = at::empty({B, part.splits, M}, acc_opts);
  BackwardParams<scalar_t, acc_t> bp{};
  bp.x = x.data_ptr<scalar_t>();
  bp.sxb = x.stride(0);
  bp.sxn = x.stride(1);
  bp.sxc = x.stride(2);
  bp.dx = dx.data_ptr<scalar_t>();
  bp.sdb = dx.stride(0);
  bp.sdn = dx.stride(1);
  bp.sdc = dx.stride(2);
  bp.A = A.data_ptr<acc_t>();
  bp.cb = cb.data_ptr<acc_t>();
  bp.dZ = dZ.data_ptr<acc_t>();
  bp.D = D.data_ptr<acc_t>();
  bp.lse = lse.data_ptr<acc_t>();
  if (grad_S.has_value()) {
    bp.gS = grad_S->data_ptr<scalar_t>();
    bp.sgb = grad_S->stride(0);
    bp.sgm = grad_S->stride(1);
    bp.sgn = grad_S->stride(2);
  }
  bp.part_dA = part_dA.data_ptr<acc_t>();
  bp.part_dc = part_dc.data_ptr<acc_t>();
  bp.N = N;
  bp.C = static_cast<int>(C);
  bp.M = static_cast<int>(M);
  bp.splits = part.splits;
  bp.split_len = part.split_len;
  bp.m_chunks = m_chunks;
  bp.ldx = ldx;
  bp.has_eps = eps.has_value();
  bp.eps = static_cast<acc_t>(eps.value_or(0.0));
  launcher.launch(kernel, B * part.splits, kThreads, smem, bp);

  auto reduce = &proxy_attention_reduce_splits_kernel<scalar_t, acc_t>;
  ReduceParams<scalar_t, acc_t> rA{bp.part_dA, dA.data_ptr<scalar_t>(), B, part.splits, M * C};
  launcher.launch(reduce, ceil_div(B * M * C, kThreads), kThreads, 0, rA);
  ReduceParams<scalar_t, acc_t> rc{bp.part_dc, dc.data_ptr<scalar_t>(), B, part.splits, M};
  launcher.launch(reduce, ceil_div(B * M, kThreads), kThreads, 0, rc);
}

// The raw forward op; the caller has checked the arguments and set the device.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_forward_impl(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, std::optional<double> eps,
    Launcher& launcher) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), M = A.size(1);
  auto Z = at::empty({B, M, C}, x.options());
  auto S = at::empty({B, M, N}, x.options());
  auto lse = at::empty({B, M}, x.options().dtype(lse_dtype(x.scalar_type())));
  if (B == 0 || M == 0) return {Z, S, lse};
  TORCH_CHECK_VALUE(M <= std::numeric_limits<int>::max() / 2, "proxy_attention: M too large");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "proxy_attention_forward_cuda", [&] {
    dispatch_channel_groups(C, [&](auto cj_tag) {
      launch_forward<scalar_t, decltype(cj_tag)::value>(x, A, c, eps, Z, S, lse, launcher);
    });
  });
  return {Z, S, lse};
}

// The raw backward op; the caller has checked the arguments and set the device.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_backward_impl(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, const at::Tensor& Z,
    const at::Tensor& lse, std::optional<double> eps, Launcher& launcher) {
  const int64_t B = x.size(0), C = x.size(2), M = A.size(1);
  // dx keeps x's memory layout (a [B, C, N] buffer viewed as [B, N, C] gets the same view).
  auto dx = at::empty_like(x);
  auto dA = at::empty({B, M, C}, x.options());
  auto dc = at::empty({B, M}, x.options());
  if (B == 0) return {dx, dA, dc};
  if (M == 0) {
    dx.zero_();
    return {dx, dA, dc};
  }
  TORCH_CHECK_VALUE(M <= std::numeric_limits<int>::max() / 2, "proxy_attention: M too large");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "proxy_attention_backward_cuda", [&] {
    dispatch_channel_groups(C, [&](auto cj_tag) {
      launch_backward<scalar_t, decltype(cj_tag)::value>(grad_Z, grad_S, x, A, c, Z, lse, eps, dx,
                                                         dA, dc, launcher);
    });
  });
  return {dx, dA, dc};
}

}  // namespace cuda
}  // namespace icl_kernels
