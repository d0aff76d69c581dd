// Vector helpers shared by kdfast's CPU kernels (ATen Vectorized: AVX2 on x86).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace kdfast {

using at::vec::Vectorized;

// Loads and stores up to kStep consecutive elements as lanes of the accumulation type.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = Vec::size();
  static Vec load(const scalar_t* p, int64_t n = kStep) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == kStep ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      return at::vec::convert<acc_t>(Vectorized<scalar_t>::loadu(p, n));
    }
  }
  static void store(scalar_t* p, const Vec& v, int64_t n = kStep) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, n);
    } else {
      at::vec::convert<scalar_t>(v).store(p, n);
    }
  }
  // A whole vector, with a non-temporal store where p is aligned (x86): no read of the
  // destination's cache lines before writing them. Callers end with stream_fence().
  static void store_stream(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
    const auto address = reinterpret_cast<uintptr_t>(p);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (address % 32 == 0) return _mm256_stream_ps(p, v);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      if (address % 32 == 0) return _mm256_stream_pd(p, v);
    } else {
      if (address % 16 == 0) {  // the low 8 of the 16 converted lanes hold v
        const __m256i packed = at::vec::convert<scalar_t>(v);
        return _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
      }
    }
#endif
    store(p, v);
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t sum = 0;
  for (int64_t l = 0; l < Vectorized<acc_t>::size(); ++l) sum += lanes[l];
  return sum;
}

// A per-thread scratch buffer reused across calls.
template <typename acc_t>
inline acc_t* scratch(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t l = 1; l < Vectorized<acc_t>::size(); ++l) m = std::max(m, lanes[l]);
  return m;
}

}  // namespace kdfast
