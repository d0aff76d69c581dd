// In-place scaling of a gradient that an op computed in its forward pass:
// grad *= grad_output for a scalar grad_output that lives on the GPU. The common case,
// grad_output == 1 (loss.backward()), is decided on the device: every block reads the
// scalar and returns, so the gradient is neither read nor written and the host never waits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace kdfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename scale_t>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(scalar_t* grad, const scale_t* grad_output, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g = static_cast<acc_t>(*grad_output);
  if (g == acc_t(1)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * g);
  }
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.numel() != 1 || !grad.is_non_overlapping_and_dense() || !grad_output.is_cuda() ||
      !grad_output.is_floating_point()) {
    grad.mul_(grad_output);  // per-row scales ('none' reduction) and unusual layouts
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const int threads = kThreads;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 132 * 16);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  KDFAST_DISPATCH_FLOATING(grad.scalar_type(), "scale_grad_cuda", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "scale_grad_cuda_scale", [&] {
      scale_grad_kernel<grad_t, scalar_t><<<blocks, threads, 0, stream>>>(
          grad.mutable_data_ptr<grad_t>(), grad_output.const_data_ptr<scalar_t>(), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CUDA, m) { m.impl("scale_grad_", &scale_grad_cuda); }

}  // namespace kdfast
