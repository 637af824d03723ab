// Test-only extension: the CUDA kernels of csrc/cuda/ compiled for the CPU
// emulation in cuda_emu.h, with the same host code as the real backend, on
// CPU tensors.  Built on the fly by tests/test_cuda_emulated.py.
#include <torch/extension.h>

#include "cuda_emu.h"
#include "cuda/proxy_attention_kernels.cuh"

namespace {

struct EmuLauncher {
  int64_t resident = 8;   // what resident_blocks reports: drives the token partition
  size_t max_smem = 0;    // largest dynamic shared memory asked for
  int64_t launches = 0;

  template <typename Kernel>
  void prepare(Kernel, size_t smem) {
    // The H100's opt-in limit per block (227 KiB).
    TORCH_CHECK(smem <= 232448, "emulated launch: ", smem, " bytes of shared memory");
    max_smem = std::max(max_smem, smem);
  }
  template <typename Kernel>
  int64_t resident_blocks(Kernel, size_t) {
    return resident;
  }
  template <typename Params>
  void launch(void (*kernel)(Params), int64_t grid, int threads, size_t smem, const Params& p) {
    ++launches;
    icl_emu::launch(kernel, grid, threads, smem, p);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& A,
                                                       const at::Tensor& c,
                                                       std::optional<double> eps,
                                                       int64_t resident, int64_t seed) {
  icl_emu::seed(static_cast<uint64_t>(seed));
  EmuLauncher launcher;
  launcher.resident = resident;
  return icl_kernels::cuda::proxy_attention_forward_impl(x, A, c, eps, launcher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const std::optional<at::Tensor>& grad_Z, const std::optional<at::Tensor>& grad_S,
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, const at::Tensor& Z,
    const at::Tensor& lse, std::optional<double> eps, int64_t resident, int64_t seed) {
  icl_emu::seed(static_cast<uint64_t>(seed));
  EmuLauncher launcher;
  launcher.resident = resident;
  return icl_kernels::cuda::proxy_attention_backward_impl(grad_Z, grad_S, x, A, c, Z, lse, eps,
                                                          launcher);
}

// (splits, split_len, m_chunks) the host code picks, to let tests aim at cases.
std::tuple<int64_t, int64_t> partition(int64_t N, int64_t units, int64_t target,
                                       int64_t partial_elems, int64_t tile) {
  const auto p = icl_kernels::cuda::partition_tokens(N, units, target, partial_elems, tile);
  return {p.splits, p.split_len};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "emulated CUDA forward", pybind11::arg("x"), pybind11::arg("A"),
        pybind11::arg("c"), pybind11::arg("eps"), pybind11::arg("resident") = 8,
        pybind11::arg("seed") = 0);
  m.def("backward", &backward, "emulated CUDA backward", pybind11::arg("grad_Z"),
        pybind11::arg("grad_S"), pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("c"),
        pybind11::arg("Z"), pybind11::arg("lse"), pybind11::arg("eps"),
        pybind11::arg("resident") = 8, pybind11::arg("seed") = 0);
  m.def("partition", &partition);
}
