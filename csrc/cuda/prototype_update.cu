// CUDA kernels of the prototype update: per-class sums [K, C] and totals [K]
// in one pass over the features, and their backward.
//
// Forward (labels and probs): a block of 256 threads owns a (batch element,
// token range) chunk and 32 channels.  Per tile of 128 tokens it stages the
// features [32, 128] (coalesced along whichever axis is contiguous) and the
// labels or probs in shared memory.  Warp w then walks tokens
// [16w, 16w + 16) of the tile with lane = channel:
//   - labels: a run-length sum (label maps are piecewise constant, so the run
//     rarely breaks; all lanes of a warp see the same labels, no divergence),
//     flushed into the warp's private row acc[k][w][lane] when the class changes;
//   - probs: 8 classes at a time in registers, probs read as shared-memory
//     broadcasts.
// Every accumulator slot has a single writer, so there are no float atomics
// inside a block; at the end the 8 warp rows are added in order and the block
// writes its [K, 32] partial.  deterministic: partials are added in block
// order by a second kernel (bitwise reproducible); otherwise the block
// atomicAdds into the output (no partial buffer, no second launch, order of
// the float additions varies run to run).
//
// Labels outside [0, K) other than ignore_index set a device flag, read back
// (one sync) when check_labels; unchecked, they are skipped.
//
// Backward: one thread per token, looping over channels (coalesced along the
// token axis of NCHW maps); no reduction across threads, so it is deterministic.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../prototype_update.h"

namespace icl_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelsPerBlock = 32;                      // one per lane
constexpr int kWarps = kThreads / 32;                      // token sub-ranges of a tile
constexpr int kTileTokens = 128;
constexpr int kTokensPerWarp = kTileTokens / kWarps;       // 16
constexpr int kTargetBlocks = 1024;                        // enough to fill any current GPU
constexpr int kClassGroup = 8;                             // probs: classes held in registers

struct Chunking {
  int64_t chunks;     // per batch element
  int64_t chunk_len;  // tokens, a multiple of the tile
};

// A function of the shapes only: the partials, and so their sum, do not
// depend on the GPU model or on anything else at run time.
Chunking chunk_tokens(int64_t B, int64_t N, int64_t cblocks) {
  const int64_t tiles = (N + kTileTokens - 1) / kTileTokens;
  const int64_t want = std::max<int64_t>(
      1, std::min<int64_t>(tiles, (kTargetBlocks + B * cblocks - 1) / (B * cblocks)));
  const int64_t len = (tiles + want - 1) / want * kTileTokens;
  return Chunking{(N + len - 1) / len, len};
}

template <typename scalar_t, typename acc_t>
struct FeatureTile {
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  bool tokens_inner;  // coalesce the staging loads along tokens (NCHW) or channels (NHWC)
};

// tile[c * (kTileTokens + 1) + t] <- features[b, c0 + c, n0 + t] (0 outside the tensor).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_features(const FeatureTile<scalar_t, acc_t>& ft, int64_t b,
                                               int c0, int C, int64_t n0, int T, acc_t* tile) {
  for (int i = threadIdx.x; i < kChannelsPerBlock * kTileTokens; i += kThreads) {
    int c, t;
    if (ft.tokens_inner) {
      t = i % kTileTokens;
      c = i / kTileTokens;
    } else {
      c = i % kChannelsPerBlock;
      t = i / kChannelsPerBlock;
    }
    acc_t v = acc_t(0);
    if (t < T && c0 + c < C) {
      v = static_cast<acc_t>(ft.f[b * ft.sfb + static_cast<int64_t>(c0 + c) * ft.sfc + (n0 + t) * ft.sfn]);
    }
    tile[c * (kTileTokens + 1) + t] = v;
  }
}

__device__ __forceinline__ int64_t read_label(const void* lab, bool lab64, int64_t off) {
  return lab64 ? static_cast<const int64_t*>(lab)[off]
               : static_cast<int64_t>(static_cast<const int32_t*>(lab)[off]);
}

// ---------------------------------------------------------------- forward, labels

template <typename scalar_t, typename acc_t>
struct LabelsForwardParams {
  FeatureTile<scalar_t, acc_t> ft;
  const void* lab;
  bool lab64;
  int64_t slb, sln;
  const acc_t* w;  // null without weights
  int64_t swb, swn;
  acc_t* out;  // [P, K, C] partials, or [K, C] with atomics
  acc_t* tot;  // [P, K], or [K] with atomics
  int* bad;    // set to 1 when a label is out of range
  int64_t N;
  int C, K;
  int64_t ignore_index;
  int64_t chunks, chunk_len;
};

template <typename acc_t>
size_t labels_forward_smem(int K) {
  const size_t accs = static_cast<size_t>(kChannelsPerBlock) * (kTileTokens + 1) + kTileTokens +
                      static_cast<size_t>(K) * kWarps * kChannelsPerBlock + static_cast<size_t>(K) * kWarps;
  return accs * sizeof(acc_t) + kTileTokens * sizeof(int);
}

template <typename scalar_t, typename acc_t, bool kHasW, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
labels_forward_kernel(const LabelsForwardParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* wt = tile + kChannelsPerBlock * (kTileTokens + 1);
  acc_t* acc_s = wt + kTileTokens;                          // [K][kWarps][32]
  acc_t* tot_s = acc_s + p.K * kWarps * kChannelsPerBlock;  // [K][kWarps]
  int* cls = reinterpret_cast<int*>(tot_s + p.K * kWarps);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t block = blockIdx.x;
  const int64_t b = block / p.chunks;
  const int64_t n_begin = (block % p.chunks) * p.chunk_len;
  const int64_t n_end = min(p.N, n_begin + p.chunk_len);
  const int c0 = blockIdx.y * kChannelsPerBlock;
  for (int i = tid; i < p.K * kWarps * (kChannelsPerBlock + 1); i += kThreads) acc_s[i] = acc_t(0);
  bool bad = false;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileTokens) {
    const int T = static_cast<int>(min(static_cast<int64_t>(kTileTokens), n_end - n0));
    __syncthreads();  // the previous tile has been read
    if (tid < kTileTokens) {
      int k = -1;
      acc_t wv = acc_t(1);
      if (tid < T) {
        const int64_t l = read_label(p.lab, p.lab64, b * p.slb + (n0 + tid) * p.sln);
        if (l != p.ignore_index) {
          if (l >= 0 && l < p.K) k = static_cast<int>(l);
          else bad = true;
        }
        if (kHasW) {
          wv = p.w[b * p.swb + (n0 + tid) * p.swn];
          if (wv == acc_t(0)) k = -1;  // adds nothing, even where features are not finite
        }
      }
      cls[tid] = k;
      wt[tid] = wv;
    }
    stage_features(p.ft, b, c0, p.C, n0, T, tile);
    __syncthreads();
    const acc_t* row = tile + lane * (kTileTokens + 1);
    int cur = -1;
    acc_t run = acc_t(0), runw = acc_t(0);
    for (int j = 0; j < kTokensPerWarp; ++j) {
      const int t = warp * kTokensPerWarp + j;
      const int k = cls[t];
      if (k != cur) {
        if (cur >= 0) {
          acc_s[(cur * kWarps + warp) * kChannelsPerBlock + lane] += run;
          if (lane == 0) tot_s[cur * kWarps + warp] += runw;
        }
        cur = k;
        run = acc_t(0);
        runw = acc_t(0);
      }
      if (k >= 0) {
        const acc_t wv = wt[t];
        run += kHasW ? wv * row[t] : row[t];
        runw += wv;
      }
    }
    if (cur >= 0) {
      acc_s[(cur * kWarps + warp) * kChannelsPerBlock + lane] += run;
      if (lane == 0) tot_s[cur * kWarps + warp] += runw;
    }
  }
  __syncthreads();
  for (int i = tid; i < p.K * kChannelsPerBlock; i += kThreads) {
    const int k = i / kChannelsPerBlock, c = i % kChannelsPerBlock;
    if (c0 + c >= p.C) continue;
    acc_t s = acc_t(0);
    for (int w = 0; w < kWarps; ++w) s += acc_s[(k * kWarps + w) * kChannelsPerBlock + c];
    if (kAtomic) {
      atomicAdd(&p.out[static_cast<int64_t>(k) * p.C + c0 + c], s);
    } else {
      p.out[(block * p.K + k) * p.C + c0 + c] = s;
    }
  }
  if (blockIdx.y == 0) {
    for (int k = tid; k < p.K; k += kThreads) {
      acc_t s = acc_t(0);
      for (int w = 0; w < kWarps; ++w) s += tot_s[k * kWarps + w];
      if (kAtomic) {
        atomicAdd(&p.tot[k], s);
      } else {
        p.tot[block * p.K + k] = s;
      }
    }
  }
  if (bad) *p.bad = 1;  // every writer stores the same value
}

// ---------------------------------------------------------------- forward, probs

template <typename scalar_t, typename acc_t>
struct ProbsForwardParams {
  FeatureTile<scalar_t, acc_t> ft;
  const scalar_t* pr;
  int64_t spb, spk, spn;
  acc_t* out;
  acc_t* tot;
  int64_t N;
  int C, K;
  int64_t chunks, chunk_len;
};

template <typename acc_t>
size_t probs_forward_smem(int K) {
  const size_t accs = static_cast<size_t>(kChannelsPerBlock) * (kTileTokens + 1) +
                      static_cast<size_t>(K) * kTileTokens +
                      static_cast<size_t>(K) * kWarps * kChannelsPerBlock + static_cast<size_t>(K);
  return accs * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
probs_forward_kernel(const ProbsForwardParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* ptile = tile + kChannelsPerBlock * (kTileTokens + 1);  // [K][kTileTokens]
  acc_t* acc_s = ptile + p.K * kTileTokens;                     // [K][kWarps][32]
  acc_t* tot_s = acc_s + p.K * kWarps * kChannelsPerBlock;      // [K]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t block = blockIdx.x;
  const int64_t b = block / p.chunks;
  const int64_t n_begin = (block % p.chunks) * p.chunk_len;
  const int64_t n_end = min(p.N, n_begin + p.chunk_len);
  const int c0 = blockIdx.y * kChannelsPerBlock;
  for (int i = tid; i < p.K * (kWarps * kChannelsPerBlock + 1); i += kThreads) acc_s[i] = acc_t(0);

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileTokens) {
    const int T = static_cast<int>(min(static_cast<int64_t>(kTileTokens), n_end - n0));
    __syncthreads();
    for (int i = tid; i < p.K * kTileTokens; i += kThreads) {
      const int k = i / kTileTokens, t = i % kTileTokens;
      ptile[i] = t < T ? static_cast<acc_t>(p.pr[b * p.spb + k * p.spk + (n0 + t) * p.spn]) : acc_t(0);
    }
    stage_features(p.ft, b, c0, p.C, n0, T, tile);
    __syncthreads();
    if (blockIdx.y == 0) {
      for (int k = tid; k < p.K; k += kThreads) {
        acc_t s = acc_t(0);
        for (int t = 0; t < T; ++t) s += ptile[k * kTileTokens + t];
        tot_s[k] += s;
      }
    }
    const acc_t* row = tile + lane * (kTileTokens + 1);
    for (int kg = 0; kg < p.K; kg += kClassGroup) {
      acc_t r[kClassGroup];
#pragma unroll
      for (int q = 0; q < kClassGroup; ++q) r[q] = acc_t(0);
      for (int j = 0; j < kTokensPerWarp; ++j) {
        const int t = warp * kTokensPerWarp + j;
        const acc_t fv = row[t];
#pragma unroll
        for (int q = 0; q < kClassGroup; ++q)
          if (kg + q < p.K) r[q] += ptile[(kg + q) * kTileTokens + t] * fv;  // a broadcast read
      }
#pragma unroll
      for (int q = 0; q < kClassGroup; ++q)
        if (kg + q < p.K) acc_s[((kg + q) * kWarps + warp) * kChannelsPerBlock + lane] += r[q];
    }
  }
  __syncthreads();
  for (int i = tid; i < p.K * kChannelsPerBlock; i += kThreads) {
    const int k = i / kChannelsPerBlock, c = i % kChannelsPerBlock;
    if (c0 + c >= p.C) continue;
    acc_t s = acc_t(0);
    for (int w = 0; w < kWarps; ++w) s += acc_s[(k * kWarps + w) * kChannelsPerBlock + c];
    if (kAtomic) {
      atomicAdd(&p.out[static_cast<int64_t>(k) * p.C + c0 + c], s);
    } else {
      p.out[(block * p.K + k) * p.C + c0 + c] = s;
    }
  }
  if (blockIdx.y == 0) {
    for (int k = tid; k < p.K; k += kThreads) {
      if (kAtomic) {
        atomicAdd(&p.tot[k], tot_s[k]);
      } else {
        p.tot[block * p.K + k] = tot_s[k];
      }
    }
  }
}

// out[j] = sum_p part[p, j], p in order.
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t P,
                                    int64_t M) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  acc_t s = part[j];
  for (int64_t q = 1; q < P; ++q) s += part[q * M + j];
  out[j] = s;
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct LabelsBackwardParams {
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  const void* lab;
  bool lab64;
  int64_t slb, sln;
  const acc_t* w;
  int64_t swb, swn;
  const acc_t* G;   // [K, C]
  const acc_t* gt;  // [K]
  scalar_t* gf;     // or null
  int64_t sgb, sgc, sgn;
  acc_t* gw;  // [B, N] contiguous, or null
  int64_t N;
  int C, K;
  int64_t ignore_index;
};

template <typename scalar_t, typename acc_t, bool kHasW>
__global__ void __launch_bounds__(kThreads)
labels_backward_kernel(const LabelsBackwardParams<scalar_t, acc_t> p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= p.N) return;
  const int64_t l = read_label(p.lab, p.lab64, b * p.slb + n * p.sln);
  const bool valid = l != p.ignore_index && l >= 0 && l < p.K;
  const acc_t* g = p.G + (valid ? l : 0) * p.C;
  const acc_t wv = kHasW ? p.w[b * p.swb + n * p.swn] : acc_t(1);
  acc_t dot = acc_t(0);
  for (int c = 0; c < p.C; ++c) {
    const acc_t gc = valid ? __ldg(g + c) : acc_t(0);
    if (p.gf != nullptr) p.gf[b * p.sgb + c * p.sgc + n * p.sgn] = static_cast<scalar_t>(valid ? gc * wv : acc_t(0));
    if (p.gw != nullptr && valid) dot += gc * static_cast<acc_t>(p.f[b * p.sfb + c * p.sfc + n * p.sfn]);
  }
  if (p.gw != nullptr) p.gw[b * p.N + n] = valid ? dot + __ldg(p.gt + l) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
struct ProbsBackwardParams {
  const scalar_t* f;
  int64_t sfb, sfc, sfn;
  const scalar_t* pr;
  int64_t spb, spk, spn;
  const acc_t* G;
  const acc_t* gt;
  scalar_t* gf;
  int64_t sgb, sgc, sgn;
  scalar_t* gp;
  int64_t sqb, sqk, sqn;
  int64_t N;
  int C, K;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
probs_backward_kernel(const ProbsBackwardParams<scalar_t, acc_t> p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= p.N) return;
  if (p.gf != nullptr) {
    for (int c = 0; c < p.C; ++c) {
      acc_t s = acc_t(0);
      for (int k = 0; k < p.K; ++k)
        s += static_cast<acc_t>(p.pr[b * p.spb + k * p.spk + n * p.spn]) * __ldg(p.G + k * p.C + c);
      p.gf[b * p.sgb + c * p.sgc + n * p.sgn] = static_cast<scalar_t>(s);
    }
  }
  if (p.gp != nullptr) {
    for (int k = 0; k < p.K; ++k) {
      acc_t s = acc_t(0);
      for (int c = 0; c < p.C; ++c)
        s += __ldg(p.G + k * p.C + c) * static_cast<acc_t>(p.f[b * p.sfb + c * p.sfc + n * p.sfn]);
      p.gp[b * p.sqb + k * p.sqk + n * p.sqn] = static_cast<scalar_t>(s + __ldg(p.gt + k));
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem, int device, int K) {
  if (smem <= 48 * 1024) return;  // the default limit, no opt-in needed
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(optin), "prototype_update (cuda backend): K=", K,
                    " classes need ", smem, " bytes of shared memory per block and the device allows ",
                    optin, "; use backend='triton' or 'torch' for this many classes");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "prototype_update (cuda backend): grid of ",
              blocks, " blocks is too large");
}

template <typename acc_t>
void sum_partials(const at::Tensor& part, at::Tensor& out, int64_t P, cudaStream_t stream) {
  const int64_t M = out.numel();
  if (M == 0) return;
  sum_partials_kernel<acc_t><<<static_cast<unsigned>((M + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      part.data_ptr<acc_t>(), out.data_ptr<acc_t>(), P, M);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
FeatureTile<scalar_t, acc_t> feature_tile(const at::Tensor& f) {
  // Coalesce along tokens unless channels are the contiguous axis.
  const bool tokens_inner = f.stride(2) == 1 || f.stride(1) != 1;
  return FeatureTile<scalar_t, acc_t>{f.data_ptr<scalar_t>(), f.stride(0), f.stride(1), f.stride(2), tokens_inner};
}

std::tuple<at::Tensor, at::Tensor> labels_forward_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& weights,
                                                       int64_t num_classes, int64_t ignore_index,
                                                       bool check_labels, bool deterministic) {
  check_prototype_labels_inputs(features, labels, weights, num_classes);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = num_classes;
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
                    "prototype_update (cuda backend): C and K must fit in int32");
  const auto acc_opts = features.options().dtype(prototype_acc_dtype(features.scalar_type()));
  auto sums = at::zeros({K, C}, acc_opts);
  auto totals = at::zeros({K}, acc_opts);
  if (B == 0 || N == 0) return {sums, totals};
  const int64_t cblocks = (C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const Chunking ch = chunk_tokens(B, N, cblocks);
  const int64_t P = B * ch.chunks;
  check_grid(P);
  auto bad = at::zeros({1}, features.options().dtype(at::kInt));
  at::Tensor part = deterministic ? at::empty({P, K, C}, acc_opts) : sums;
  at::Tensor part_tot = deterministic ? at::empty({P, K}, acc_opts) : totals;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int device = features.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_labels_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    LabelsForwardParams<scalar_t, acc_t> p{
        feature_tile<scalar_t, acc_t>(features),
        labels.data_ptr(), labels.scalar_type() == at::kLong, labels.stride(0), labels.stride(1),
        weights.has_value() ? weights->data_ptr<acc_t>() : nullptr,
        weights.has_value() ? weights->stride(0) : 0, weights.has_value() ? weights->stride(1) : 0,
        part.data_ptr<acc_t>(), part_tot.data_ptr<acc_t>(), bad.data_ptr<int>(),
        N, static_cast<int>(C), static_cast<int>(K), ignore_index, ch.chunks, ch.chunk_len};
    const size_t smem = labels_forward_smem<acc_t>(static_cast<int>(K));
    const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(cblocks));
    auto launch = [&](auto kernel) {
      allow_smem(kernel, smem, device, static_cast<int>(K));
      kernel<<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool has_w = weights.has_value();
    if (has_w && deterministic) launch(labels_forward_kernel<scalar_t, acc_t, true, false>);
    else if (has_w) launch(labels_forward_kernel<scalar_t, acc_t, true, true>);
    else if (deterministic) launch(labels_forward_kernel<scalar_t, acc_t, false, false>);
    else launch(labels_forward_kernel<scalar_t, acc_t, false, true>);
    if (deterministic) {
      sum_partials<acc_t>(part, sums, P, stream);
      sum_partials<acc_t>(part_tot, totals, P, stream);
    }
  });
  if (check_labels && bad.item<int>() != 0) throw_invalid_label_unknown(K, ignore_index);  // one sync
  return {sums, totals};
}

std::tuple<at::Tensor, at::Tensor> probs_forward_cuda(const at::Tensor& features, const at::Tensor& probs,
                                                      bool deterministic) {
  check_prototype_probs_inputs(features, probs);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = probs.size(1);
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
                    "prototype_update (cuda backend): C and K must fit in int32");
  const auto acc_opts = features.options().dtype(prototype_acc_dtype(features.scalar_type()));
  auto sums = at::zeros({K, C}, acc_opts);
  auto totals = at::zeros({K}, acc_opts);
  if (B == 0 || N == 0) return {sums, totals};
  const int64_t cblocks = (C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const Chunking ch = chunk_tokens(B, N, cblocks);
  const int64_t P = B * ch.chunks;
  check_grid(P);
  at::Tensor part = deterministic ? at::empty({P, K, C}, acc_opts) : sums;
  at::Tensor part_tot = deterministic ? at::empty({P, K}, acc_opts) : totals;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int device = features.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_probs_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ProbsForwardParams<scalar_t, acc_t> p{
        feature_tile<scalar_t, acc_t>(features),
        probs.data_ptr<scalar_t>(), probs.stride(0), probs.stride(1), probs.stride(2),
        part.data_ptr<acc_t>(), part_tot.data_ptr<acc_t>(),
        N, static_cast<int>(C), static_cast<int>(K), ch.chunks, ch.chunk_len};
    const size_t smem = probs_forward_smem<acc_t>(static_cast<int>(K));
    const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(cblocks));
    auto launch = [&](auto kernel) {
      allow_smem(kernel, smem, device, static_cast<int>(K));
      kernel<<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (deterministic) launch(probs_forward_kernel<scalar_t, acc_t, false>);
    else launch(probs_forward_kernel<scalar_t, acc_t, true>);
    if (deterministic) {
      sum_partials<acc_t>(part, sums, P, stream);
      sum_partials<acc_t>(part_tot, totals, P, stream);
    }
  });
  return {sums, totals};
}

std::tuple<at::Tensor, at::Tensor> labels_backward_cuda(
    const at::Tensor& grad_sums, const at::Tensor& grad_totals, const at::Tensor& features,
    const at::Tensor& labels, const std::optional<at::Tensor>& weights, int64_t ignore_index,
    bool need_features_grad, bool need_weights_grad) {
  const int64_t K = grad_sums.dim() >= 1 ? grad_sums.size(0) : 0;
  check_prototype_labels_inputs(features, labels, weights, std::max<int64_t>(K, 1));
  check_prototype_grads(grad_sums, grad_totals, features, K);
  TORCH_CHECK_VALUE(!need_weights_grad || weights.has_value(),
                    "prototype_update backward: need_weights_grad without weights");
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2);
  at::Tensor gf = need_features_grad ? at::empty_like(features) : features.new_empty({0});
  at::Tensor gw = need_weights_grad ? at::empty({B, N}, weights->options()) : grad_sums.new_empty({0});
  if (B == 0 || N == 0 || (!need_features_grad && !need_weights_grad)) return {gf, gw};
  TORCH_CHECK(B <= 65535, "prototype_update (cuda backend): batch ", B, " exceeds the grid limit 65535");
  check_grid((N + kThreads - 1) / kThreads);
  auto G = grad_sums.contiguous();
  auto gt = grad_totals.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_labels_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    LabelsBackwardParams<scalar_t, acc_t> p{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        labels.data_ptr(), labels.scalar_type() == at::kLong, labels.stride(0), labels.stride(1),
        weights.has_value() ? weights->data_ptr<acc_t>() : nullptr,
        weights.has_value() ? weights->stride(0) : 0, weights.has_value() ? weights->stride(1) : 0,
        G.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
        need_features_grad ? gf.data_ptr<scalar_t>() : nullptr,
        need_features_grad ? gf.stride(0) : 0, need_features_grad ? gf.stride(1) : 0,
        need_features_grad ? gf.stride(2) : 0,
        need_weights_grad ? gw.data_ptr<acc_t>() : nullptr,
        N, static_cast<int>(C), static_cast<int>(K), ignore_index};
    const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(B));
    if (weights.has_value()) {
      labels_backward_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      labels_backward_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gf, gw};
}

std::tuple<at::Tensor, at::Tensor> probs_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& grad_totals,
                                                       const at::Tensor& features, const at::Tensor& probs,
                                                       bool need_features_grad, bool need_probs_grad) {
  check_prototype_probs_inputs(features, probs);
  const int64_t K = probs.size(1);
  check_prototype_grads(grad_sums, grad_totals, features, K);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2);
  at::Tensor gf = need_features_grad ? at::empty_like(features) : features.new_empty({0});
  at::Tensor gp = need_probs_grad ? at::empty_like(probs) : probs.new_empty({0});
  if (B == 0 || N == 0 || (!need_features_grad && !need_probs_grad)) return {gf, gp};
  TORCH_CHECK(B <= 65535, "prototype_update (cuda backend): batch ", B, " exceeds the grid limit 65535");
  check_grid((N + kThreads - 1) / kThreads);
  auto G = grad_sums.contiguous();
  auto gt = grad_totals.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prototype_update_probs_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ProbsBackwardParams<scalar_t, acc_t> p{
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        probs.data_ptr<scalar_t>(), probs.stride(0), probs.stride(1), probs.stride(2),
        G.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
        need_features_grad ? gf.data_ptr<scalar_t>() : nullptr,
        need_features_grad ? gf.stride(0) : 0, need_features_grad ? gf.stride(1) : 0,
        need_features_grad ? gf.stride(2) : 0,
        need_probs_grad ? gp.data_ptr<scalar_t>() : nullptr,
        need_probs_grad ? gp.stride(0) : 0, need_probs_grad ? gp.stride(1) : 0,
        need_probs_grad ? gp.stride(2) : 0,
        N, static_cast<int>(C), static_cast<int>(K)};
    const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(B));
    probs_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gf, gp};
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_kernels, CUDA, m) {
  m.impl("_prototype_update_labels_forward", &labels_forward_cuda);
  m.impl("_prototype_update_labels_backward", &labels_backward_cuda);
  m.impl("_prototype_update_probs_forward", &probs_forward_cuda);
  m.impl("_prototype_update_probs_backward", &probs_backward_cuda);
}

}  // namespace cuda
}  // namespace icl_kernels
