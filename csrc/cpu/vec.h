// Vector helpers shared by kdfast's CPU kernels (ATen Vectorized).
//
// Compiled once per instruction set (setup.py: DEFAULT, AVX2, AVX512), so everything here
// lives in the inline namespace kdfast::CPU_CAPABILITY, as ATen's at::vec does: the builds'
// copies are different functions, not one name with several bodies.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace kdfast {
inline namespace CPU_CAPABILITY {

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
    const auto address = reinterpret_cast<uintptr_t>(p);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (address % 64 == 0) return _mm512_stream_ps(p, v);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      if (address % 64 == 0) return _mm512_stream_pd(p, v);
    } else {
      if (address % 32 == 0) {  // the low 16 of the 32 converted lanes hold v
        const __m512i packed = at::vec::convert<scalar_t>(v);
        return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
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
    (void)address;
    store(p, v);
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Whether outputs of `bytes` in all are written with non-temporal stores: when they outgrow
// the threads' L2 caches together, a cached store would first read every line it writes
// (a third more traffic) and push out what the caches hold.
inline bool stream_stores(int64_t bytes, int64_t threads) { return bytes > threads * (int64_t(2) << 20); }

// Brings the cache line holding p towards the core (into L2), ahead of its use.
inline void prefetch_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
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

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t l = 1; l < Vectorized<acc_t>::size(); ++l) m = std::max(m, lanes[l]);
  return m;
}

// Runs body(begin, end) over [0, n) in chunks of `chunk` that the threads take in turn from a
// shared counter. at::parallel_for hands each thread an equal range up front, so one thread
// that the OS deschedules (another process on a shared machine) holds the whole call up; here
// the other threads take over its remaining chunks.
template <typename Body>
inline void parallel_chunks(int64_t n, int64_t chunk, const Body& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  if (workers <= 1) return body(int64_t(0), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// A per-thread scratch buffer reused across calls.
template <typename acc_t>
inline acc_t* scratch(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// max(a, b) lane by lane, where a NaN in b may be dropped: for running maxima whose NaNs
// reach the result through other terms (one instruction instead of ATen's three).
template <typename acc_t>
inline Vectorized<acc_t> max_dropping_nan(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_max_ps(b, a);
  if constexpr (std::is_same_v<acc_t, double>) return _mm512_max_pd(b, a);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_max_ps(b, a);
  if constexpr (std::is_same_v<acc_t, double>) return _mm256_max_pd(b, a);
#endif
  return at::vec::maximum(a, b);
}

// acc + a * b where a != 0, acc where a == 0: terms weighted by a probability that is
// exactly 0 add nothing, even when b is infinite (a NaN a still gives NaN).
template <typename acc_t>
inline Vectorized<acc_t> fma_where_nonzero(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b,
                                           const Vectorized<acc_t>& acc) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask3_fmadd_ps(a, b, acc, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ));
  }
  if constexpr (std::is_same_v<acc_t, double>) {
    return _mm512_mask3_fmadd_pd(a, b, acc, _mm512_cmp_pd_mask(a, _mm512_setzero_pd(), _CMP_NEQ_UQ));
  }
#endif
  const Vectorized<acc_t> zero(0);
  return acc + Vectorized<acc_t>::blendv(a * b, zero, a == zero);
}

// divergence_terms' elementwise operations (csrc/softmax_kl_math.h) on vectors of lanes:
// the counterpart of its ScalarOps.
template <typename acc_t>
struct VecOps {
  using V = Vectorized<acc_t>;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V abs(const V& x) { return x.abs(); }
  static V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V sign(const V& x) {
    const V zero(0);
    return V::blendv(V::blendv(zero, V(1), x > zero), V(-1), x < zero);
  }
};

// 2^u for u <= 0 (or NaN, or -inf: 0; small positive u are fine too), the exponentials of
// the softmax kernels, whose arguments are (x - max) log2(e)/T. float on AVX2/AVX-512:
// u = n + f with n = floor(u), 0 <= f < 1; 2^f by a degree-5 polynomial (relative error
// 8e-8, p(0) = 1 exactly), then the exponent n added exactly (AVX-512: vreduceps gives f
// and vscalefps applies floor(u), one instruction each, -inf and NaN included: 7 in all;
// AVX2: through the exponent bits, results below ~2^-126 flushed to 0: 12). Evaluated in float32: relative error <= 1.7e-7
// (2.8 ulp; tests/test_cpu_capability.py), where SLEEF's 1-ulp exp takes about twice the
// instructions. Elsewhere (double, or the portable build): ATen's exp2.
template <typename acc_t>
inline Vectorized<acc_t> exp2_nonpositive(const Vectorized<acc_t>& u) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 2^f ~ 1 + f (c1 + f (c2 + f (c3 + f (c4 + f c5)))) on [0, 1), fitted by minimising the
    // largest relative error
    constexpr float c1 = 0.693151295f, c2 = 0.240164444f, c3 = 0.0557999127f, c4 = 0.00901703071f,
                    c5 = 0.00186712993f;
#if defined(CPU_CAPABILITY_AVX512)
    // f = u - floor(u); +-inf give 0 (and then scalef(1, -inf) = 0), NaN stays NaN.
    const __m512 f = _mm512_reduce_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(c5), f, _mm512_set1_ps(c4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, u);  // p 2^floor(u): 0 below the float range, exact above
#else
    const __m256 x = _mm256_max_ps(_mm256_set1_ps(-127.0f), u);  // -127: exponent bits 0, result 0
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(c5), f, _mm256_set1_ps(c4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    // 2^n for n in [-127, 127]: (n + 127) << 23 (n = -127: 0). NaN: p is NaN, any scale keeps it.
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#endif
  }
#endif
  return u.exp2();
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
