// CUDA backend of the proxy attention raw ops: device guard, stream and launch
// checks around the kernels of proxy_attention_kernels.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "proxy_attention_kernels.cuh"

namespace icl_kernels {
namespace cuda {
namespace {

// Per (kernel, device) facts that cost driver calls: the dynamic shared memory
// allowed so far and the blocks resident per SM for a given amount of it.
struct KernelFacts {
  size_t smem_allowed = 48 * 1024;  // the default limit, no opt-in needed
  std::map<size_t, int> per_sm;     // smem bytes -> resident blocks per SM
};

KernelFacts& kernel_facts(const void* kernel, int device) {
  static std::map<std::pair<const void*, int>, KernelFacts> facts;
  return facts[{kernel, device}];
}

std::mutex& kernel_facts_mutex() {
  static std::mutex m;
  return m;
}

// Launches on the current stream of the guarded device (see the launcher
// interface in proxy_attention_kernels.cuh).
struct CudaLauncher {
  cudaStream_t stream;
  int device;

  template <typename Kernel>
  void prepare(Kernel kernel, size_t smem) {
    const std::lock_guard<std::mutex> lock(kernel_facts_mutex());
    KernelFacts& f = kernel_facts(reinterpret_cast<const void*>(kernel), device);
    if (smem <= f.smem_allowed) return;
    int optin = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "proxy_attention (cuda backend): this shape "
                "needs ", smem, " bytes of shared memory per block, the device allows ", optin,
                "; use a smaller C, float32 instead of float64, or backend='triton'/'torch'");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    f.smem_allowed = smem;
  }

  template <typename Kernel>
  int64_t resident_blocks(Kernel kernel, size_t smem) {
    int per_sm = 0;
    {
      const std::lock_guard<std::mutex> lock(kernel_facts_mutex());
      KernelFacts& f = kernel_facts(reinterpret_cast<const void*>(kernel), device);
      auto it = f.per_sm.find(smem);
      if (it == f.per_sm.end()) {
        C10_CUDA_CHECK(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
        it = f.per_sm.emplace(smem, per_sm).first;
      }
      per_sm = it->second;
    }
    const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
    return static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  }

  template <typename Params>
  void launch(void (*kernel)(Params), int64_t grid, int threads, size_t smem, const Params& p) {
    if (grid == 0) return;
    TORCH_CHECK(grid <= std::numeric_limits<int>::max(),
                "proxy_attention (cuda backend): grid of ", grid, " blocks is too large");
    kernel<<<dim3(static_cast<unsigned>(grid)), dim3(threads), smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLauncher make_launcher(const at::Tensor& x) {
  const int device = x.device().index();
  return CudaLauncher{at::cuda::getCurrentCUDAStream(device).stream(), device};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_forward_cuda(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, std::optional<double> eps) {
  check_proxy_attention_inputs(x, A, c, eps);  // before the guard: x may not be a CUDA tensor
  TORCH_CHECK_VALUE(x.is_cuda(), "proxy_attention (cuda backend): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  CudaLauncher launcher = make_launcher(x);
  return proxy_attention_forward_impl(x, A, c, eps, launcher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_attention_backward_cuda(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, const at::Tensor& Z,
    const at::Tensor& lse, std::optional<double> eps) {
  check_proxy_attention_backward_inputs(grad_Z, grad_S, x, A, c, Z, lse, eps);
  TORCH_CHECK_VALUE(x.is_cuda(), "proxy_attention (cuda backend): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  CudaLauncher launcher = make_launcher(x);
  return proxy_attention_backward_impl(grad_Z, grad_S, x, A, c, Z, lse, eps, launcher);
}

}  // namespace

TORCH_LIBRARY_IMPL(icl_kernels, CUDA, m) {
  m.impl("_proxy_attention_forward", &proxy_attention_forward_cuda);
  m.impl("_proxy_attention_backward", &proxy_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace icl_kernels
