// What the CUDA half of kdfast._C was compiled for, read off the compiler.
#include <cuda_runtime_api.h>

#include <string>

namespace kdfast {
#define KDFAST_STR2(...) #__VA_ARGS__
#define KDFAST_STR(...) KDFAST_STR2(__VA_ARGS__)

std::string cuda_build_info() {
  std::string info = "cuda_runtime=" + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string((CUDART_VERSION % 1000) / 10) + "\n";
#ifdef __CUDA_ARCH_LIST__
  info += "cuda_archs=" KDFAST_STR(__CUDA_ARCH_LIST__) "\n";  // e.g. 800,900
#endif
  return info;
}
}  // namespace kdfast
