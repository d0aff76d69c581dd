// This build's table of entry points (csrc/cpu/dispatch.h).
#include "cpu/kernels/kernels.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {

extern const CpuKernels kCpuKernels;
const CpuKernels kCpuKernels{&softmax_kl_cpu, &attention_transfer_forward_cpu, &attention_transfer_backward_cpu,
                             &cpu_exp};

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
