// KDFAST_HD: a function of the per-row / per-sample math shared by the C++ and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline
#endif
