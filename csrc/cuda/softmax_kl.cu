// Fused temperature-softmax divergences on CUDA GPUs (math: softmax_kl_math.h).
//
// Every kernel keeps, per row, an online max and sum of exp((x - M)/T) for the student and
// the teacher plus the divergence's cross sum (forward KL: the teacher-weighted gap; reverse
// KL: the student-weighted gap to the anchor), merges them across threads, finishes the row
// (loss, gradient constants) and writes the gradient, e.g. grad_j = a e_s,j - b e_t,j for
// forward KL. Each kernel serves both families of divergences (ForwardKL, LLMDivergences):
//   rows kernel     one block per row with contiguous classes; 16-byte loads; the row is
//                   kept in shared memory when it fits, so the later passes re-read
//                   nothing from HBM (traffic: read s, read t, write grad);
//   cluster kernel  (sm_90) rows too large for one block's shared memory are split over a
//                   thread-block cluster of up to 8 blocks, each caching its slice; the
//                   blocks merge their statistics through distributed shared memory;
//   columns kernel  rows contiguous with each other, classes strided (e.g. [B, C, H, W]
//                   with dim=1): one thread per row, neighbouring threads on neighbouring
//                   rows, so every load is coalesced.
// exp is computed as exp2((x - M) * log2(e)/T): one MUFU instruction.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "../softmax_kl.h"
#include "../softmax_kl_plan.h"

namespace kdfast {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t exp2_(acc_t x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return exp2(x);
  } else {
    return exp2f(x);
  }
}

__host__ __device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* s;
  const scalar_t* t;
  scalar_t* grad;            // nullptr: no gradient
  const int64_t* target;     // nullptr: no target
  acc_t* row_loss;
  const double* scale;       // d(reduced loss)/d(row loss), on the device
  int64_t V, I, rows;
  int64_t s_sa, s_si, s_sv, t_sa, t_si, t_sv, g_sa, g_si, g_sv, r_sa, r_si;
  acc_t T, k, inv_T, alpha, beta;  // k = log2(e) / T
  int64_t ignore_index;
  bool decoupled;
  Divergence div;                      // ForwardKL or one of LLMDivergences
  acc_t jsd_beta, jsd_one_minus_beta;
};

// ---------------------------------------------------------------------------------------
// Two families of divergences share the kernels below (rows, cluster, columns), each a
// struct with its running statistics (Accum), its row finish and its gradient:
//   ForwardKL       forward KL and DecoupledKD: the teacher-weighted gap sum; gradient
//                   grad_j = a e_s,j - b e_t,j (softmax_kl_finish_row);
//   LLMDivergences  reverse KL, JSD, TVD (csrc/softmax_kl_math.h, "The LLM divergences"):
//                   the anchor t_a and reverse KL's anchored cross sum; JSD and TVD take a
//                   pass between the statistics and the gradient for the loss and W (from
//                   the shared-memory copy of the row when the plan caches it: no more reads
//                   of HBM than forward KL).

// exp((m_old - m_new)/T), with nothing seen yet (-inf) weighing 0.
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t m_old, acc_t m_new, acc_t k) {
  return m_old == neg_inf<acc_t>() ? acc_t(0) : exp2_((m_old - m_new) * k);
}

// The centre of a running maximum: the maximum, or 0 while nothing has been seen (-inf).
template <typename acc_t>
__device__ __forceinline__ acc_t centre(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Forward KL's running statistics of (part of) a row: maxima of the raw logits, sums of
// exp((x - M)/T), and the teacher-weighted gap sum of the centred logits, all relative to
// the current maxima.
template <typename acc_t>
struct RowAccum {
  acc_t m_s, z_s, m_t, z_t, c;

  __device__ static RowAccum empty() { return {neg_inf<acc_t>(), 0, neg_inf<acc_t>(), 0, 0}; }

  // Adds n elements; excluded classes arrive as -inf in both (probability 0). c stays
  // centred on the running maxima (softmax_kl_recentre, csrc/softmax_kl_math.h).
  template <int N, typename P>
  __device__ void add(const acc_t (&xs)[N], const acc_t (&xt)[N], int n, const P& p) {
    acc_t ms = m_s, mt = m_t;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        ms = xs[i] > ms ? xs[i] : ms;  // NaN never becomes the max; it reaches the sums below
        mt = xt[i] > mt ? xt[i] : mt;
      }
    }
    if (ms > m_s || mt > m_t) {
      const acc_t ft = mt > m_t ? rescale(m_t, mt, p.k) : acc_t(1);
      c = softmax_kl_recentre(c, z_t, centre(m_s), centre(m_t), centre(ms), centre(mt), p.inv_T, ft);
      z_t *= ft;
      if (ms > m_s) z_s *= rescale(m_s, ms, p.k);
      m_s = ms;
      m_t = mt;
    }
    const acc_t ref_s = centre(m_s), ref_t = centre(m_t);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        z_s += exp2_((xs[i] - ref_s) * p.k);
        const acc_t e_t = exp2_((xt[i] - ref_t) * p.k);
        z_t += e_t;
        // classes of probability 0 add 0
        if (e_t > acc_t(0)) c += e_t * ((xt[i] - ref_t) - (xs[i] - ref_s)) * p.inv_T;
      }
    }
  }

  template <typename P>
  __device__ void merge(const RowAccum& o, const P& p) {
    const acc_t ms = o.m_s > m_s ? o.m_s : m_s, mt = o.m_t > m_t ? o.m_t : m_t;
    const acc_t fs = rescale(m_s, ms, p.k), fos = rescale(o.m_s, ms, p.k);
    const acc_t ft = rescale(m_t, mt, p.k), fot = rescale(o.m_t, mt, p.k);
    c = softmax_kl_recentre(c, z_t, centre(m_s), centre(m_t), centre(ms), centre(mt), p.inv_T, ft) +
        softmax_kl_recentre(o.c, o.z_t, centre(o.m_s), centre(o.m_t), centre(ms), centre(mt), p.inv_T, fot);
    z_s = z_s * fs + o.z_s * fos;
    z_t = z_t * ft + o.z_t * fot;
    m_s = ms;
    m_t = mt;
  }
};

// The LLM divergences' running statistics: maxima, sums of exp((x - M)/T), t_a (the
// teacher's logit at the student's running argmax, the anchor) and, for reverse KL, the
// anchored cross sum c = sum e^ys ((s - s_a) - (t - t_a))/T (reverse_kl_recentre when the
// anchor moves).
template <typename acc_t>
struct DivAccum {
  acc_t m_s, z_s, m_t, z_t, t_a, c;

  __device__ static DivAccum empty() { return {neg_inf<acc_t>(), 0, neg_inf<acc_t>(), 0, 0, 0}; }

  template <int N, typename P>
  __device__ void add(const acc_t (&xs)[N], const acc_t (&xt)[N], int n, const P& p) {
    const bool rkl = p.div == Divergence::ReverseKL;
    acc_t ms = m_s, mt = m_t, ta = t_a;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        if (xs[i] > ms) {  // NaN never becomes the max; it reaches the sums below
          ms = xs[i];
          ta = xt[i];
        }
        mt = xt[i] > mt ? xt[i] : mt;
      }
    }
    if (ms > m_s) {
      const acc_t f = rescale(m_s, ms, p.k);
      if (rkl) c = reverse_kl_recentre(c, z_s, centre(m_s), t_a, ms, ta, p.inv_T, f);
      z_s *= f;
      m_s = ms;
      t_a = ta;
    }
    if (mt > m_t) {
      z_t *= rescale(m_t, mt, p.k);
      m_t = mt;
    }
    const acc_t ref_s = centre(m_s), ref_t = centre(m_t);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) {
        const acc_t e_s = exp2_((xs[i] - ref_s) * p.k);
        z_s += e_s;
        z_t += exp2_((xt[i] - ref_t) * p.k);
        if (rkl && e_s > acc_t(0)) c += e_s * ((xs[i] - ref_s) - (xt[i] - t_a)) * p.inv_T;
      }
    }
  }

  template <typename P>
  __device__ void merge(const DivAccum& o, const P& p) {
    const bool theirs = o.m_s > m_s;  // the anchor: the larger student maximum (ties: ours)
    const acc_t ms = theirs ? o.m_s : m_s, ta = theirs ? o.t_a : t_a;
    const acc_t mt = o.m_t > m_t ? o.m_t : m_t;
    const acc_t fs = rescale(m_s, ms, p.k), fos = rescale(o.m_s, ms, p.k);
    if (p.div == Divergence::ReverseKL) {
      c = reverse_kl_recentre(c, z_s, centre(m_s), t_a, centre(ms), ta, p.inv_T, fs) +
          reverse_kl_recentre(o.c, o.z_s, centre(o.m_s), o.t_a, centre(ms), ta, p.inv_T, fos);
    }
    z_s = z_s * fs + o.z_s * fos;
    z_t = z_t * rescale(m_t, mt, p.k) + o.z_t * rescale(o.m_t, mt, p.k);
    m_s = ms;
    m_t = mt;
    t_a = ta;
  }
};

// The statistics of the lane `offset` away in the warp, field by field (every field of
// RowAccum and DivAccum is an acc_t).
template <typename Accum>
__device__ __forceinline__ Accum shfl_xor(const Accum& r, int offset) {
  using acc_t = decltype(r.m_s);
  static_assert(sizeof(Accum) % sizeof(acc_t) == 0, "statistics hold acc_t fields only");
  constexpr int kFields = sizeof(Accum) / sizeof(acc_t);
  acc_t fields[kFields];
  memcpy(fields, &r, sizeof(Accum));
#pragma unroll
  for (int i = 0; i < kFields; ++i) fields[i] = __shfl_xor_sync(0xffffffff, fields[i], offset);
  Accum o;
  memcpy(&o, fields, sizeof(Accum));
  return o;
}

// Merges every thread's statistics; the result is valid in thread 0.
template <typename Accum, typename P>
__device__ Accum block_merge(Accum r, const P& p) {
  __shared__ Accum warp_stats[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) r.merge(shfl_xor(r, offset), p);
  if (lane == 0) warp_stats[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < (blockDim.x + 31) / 32 ? warp_stats[lane] : Accum::empty();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) r.merge(shfl_xor(r, offset), p);
  }
  __syncthreads();  // warp_stats may be reused by the caller's next row
  return r;
}

// What a row's loss and gradient passes need, computed by one thread and shared with the block.
template <typename acc_t>
struct RowFinish {
  acc_t a, b;      // forward KL: grad = a e^ys - b e^yt; reverse KL: a e^ys (d - b);
                   // JSD, TVD: a (w - q b), b = W
  acc_t grad_g;    // DecoupledKD: the gradient at the target class
  acc_t m_s, m_t;
  acc_t t_a, inv_z_s, inv_z_t, log_ratio, h_a;  // the LLM divergences (log_ratio = log Z_s - log Z_t)
  int64_t g;       // target class excluded from the sums (DecoupledKD), or -1
  int state;       // 0: normal, 1: ignored row (zeros), 2: NaN (invalid label, x/T overflows)
};

// Row status from the target: ignored, invalid DecoupledKD label, or the class to exclude.
template <typename scalar_t, typename acc_t>
__device__ RowFinish<acc_t> row_status(const Params<scalar_t, acc_t>& p, int64_t out) {
  RowFinish<acc_t> f{};
  f.g = -1;
  if (p.target != nullptr) {
    const int64_t label = p.target[out];
    if (label == p.ignore_index) {
      f.state = 1;
    } else if (p.decoupled) {
      if (label < 0 || label >= p.V) {
        f.state = 2;
      } else {
        f.g = label;
      }
    }
  }
  return f;
}

template <typename acc_t>
struct CudaOps {  // divergence_terms' elementwise operations: exp as one exp2 (MUFU)
  using V = acc_t;
  static __host__ __device__ __forceinline__ V exp(V x) {
    if constexpr (std::is_same_v<V, double>) {
      return ::exp2(x * 1.4426950408889634);
    } else {
      return ::exp2f(x * 1.4426950408889634f);
    }
  }
  static __host__ __device__ __forceinline__ V log(V x) { return ::log(x); }
  static __host__ __device__ __forceinline__ V abs(V x) { return x < V(0) ? -x : x; }
  static __host__ __device__ __forceinline__ V select(bool mask, V a, V b) { return mask ? a : b; }
  static __host__ __device__ __forceinline__ V sign(V x) { return x > V(0) ? V(1) : (x < V(0) ? V(-1) : V(0)); }
};

struct ForwardKL {
  template <typename acc_t>
  using Accum = RowAccum<acc_t>;
  static constexpr bool kLossPass = false;

  // Thread 0: the row's loss (written when write_loss) and gradient constants.
  template <typename scalar_t, typename acc_t>
  __device__ static RowFinish<acc_t> finish(const Params<scalar_t, acc_t>& p, const RowAccum<acc_t>& r,
                                            RowFinish<acc_t> f, const scalar_t* sr, const scalar_t* tr, int64_t out,
                                            bool write_loss) {
    SoftmaxKLRowStats<acc_t> st{r.m_s, r.z_s, r.m_t, r.z_t, r.c, acc_t(0), acc_t(0)};
    if (f.g >= 0) {
      st.s_g = static_cast<acc_t>(sr[f.g * p.s_sv]);
      st.t_g = static_cast<acc_t>(tr[f.g * p.t_sv]);
    }
    const auto res = softmax_kl_finish_row<acc_t>(st, p.T, p.decoupled, p.alpha, p.beta,
                                                  static_cast<acc_t>(*p.scale));
    if (write_loss) p.row_loss[out] = res.loss;
    f.a = res.a;
    f.b = res.b;
    f.grad_g = res.grad_g;
    f.m_s = r.m_s;
    f.m_t = r.m_t;
    return f;
  }

  template <typename scalar_t, typename acc_t>
  __device__ static acc_t grad(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f, acc_t xs, acc_t xt,
                               int64_t j) {
    if (j == f.g) return f.grad_g;
    return f.a * exp2_((xs - f.m_s) * p.k) - f.b * exp2_((xt - f.m_t) * p.k);
  }
};

struct LLMDivergences {
  template <typename acc_t>
  using Accum = DivAccum<acc_t>;
  static constexpr bool kLossPass = true;  // JSD, TVD (not reverse KL: needs_loss_pass)

  template <typename scalar_t, typename acc_t>
  __device__ static bool needs_loss_pass(const Params<scalar_t, acc_t>& p) {
    return p.div != Divergence::ReverseKL;
  }

  // Thread 0: the row's finish from its statistics; reverse KL writes its loss here.
  template <typename scalar_t, typename acc_t>
  __device__ static RowFinish<acc_t> finish(const Params<scalar_t, acc_t>& p, const DivAccum<acc_t>& r,
                                            RowFinish<acc_t> f, const scalar_t*, const scalar_t*, int64_t out,
                                            bool write_loss) {
    f.m_s = r.m_s;
    f.m_t = r.m_t;
    f.t_a = r.t_a;
    f.inv_z_s = acc_t(1) / r.z_s;
    f.inv_z_t = acc_t(1) / r.z_t;
    f.log_ratio = ::log(r.z_s) - ::log(r.z_t);
    f.state = softmax_kl_overflows(r.m_s, p.inv_T) || softmax_kl_overflows(r.m_t, p.inv_T) ? 2 : 0;
    const acc_t scale = static_cast<acc_t>(*p.scale);
    if (p.div == Divergence::ReverseKL) {
      const ReverseKLRow<acc_t> row = reverse_kl_finish_row<acc_t>(r.z_s, r.z_t, r.c, r.m_t, r.t_a, p.T, scale);
      if (write_loss) p.row_loss[out] = f.state == 2 ? std::numeric_limits<acc_t>::quiet_NaN() : row.loss;
      f.a = row.a;
      f.b = row.b;
    } else {
      f.a = divergence_grad_scale(p.div, p.T) * scale;
      const acc_t ls_a = -::log(r.z_s), lt_a = (r.t_a - r.m_t) * p.inv_T - ::log(r.z_t);
      f.h_a = divergence_terms<CudaOps<acc_t>>(p.div, lt_a - ls_a, CudaOps<acc_t>::exp(ls_a),
                                               CudaOps<acc_t>::exp(lt_a), p.jsd_beta, p.jsd_one_minus_beta)
                  .h;
    }
    return f;
  }

  // JSD, TVD: a class's loss term and weight w from its logits.
  template <typename scalar_t, typename acc_t>
  __device__ static void class_share(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f, acc_t xs, acc_t xt,
                                     acc_t& loss, acc_t& w, acc_t& ps) {
    ps = exp2_((xs - f.m_s) * p.k) * f.inv_z_s;
    const acc_t pt = exp2_((xt - f.m_t) * p.k) * f.inv_z_t;
    const acc_t d = ((xt - f.m_t) - (xs - f.m_s)) * p.inv_T + f.log_ratio;  // log p - log q
    const ClassTerms<acc_t> c =
        divergence_terms<CudaOps<acc_t>>(p.div, d, ps, pt, p.jsd_beta, p.jsd_one_minus_beta);
    loss = c.loss;
    w = divergence_weight<CudaOps<acc_t>>(p.div, c, ps, f.h_a);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static acc_t grad(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f, acc_t xs, acc_t xt,
                               int64_t) {
    if (p.div == Divergence::ReverseKL) {
      const acc_t e_s = exp2_((xs - f.m_s) * p.k);
      return e_s > acc_t(0) ? f.a * e_s * (((xs - f.m_s) - (xt - f.t_a)) * p.inv_T - f.b) : acc_t(0);
    }
    acc_t loss, w, ps;
    class_share(p, f, xs, xt, loss, w, ps);
    return f.a * (w - ps * f.b);
  }
};

// A class's gradient; ignored rows get exact zeros (even for NaN input), NaN rows NaN.
template <typename Family, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_value(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f, acc_t xs,
                                            acc_t xt, int64_t j) {
  if (f.state == 1) return acc_t(0);
  if (f.state == 2) return std::numeric_limits<acc_t>::quiet_NaN();
  return Family::grad(p, f, xs, xt, j);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads n <= N consecutive elements (16-byte vector loads when kVec and n == N).
template <int N, bool kVec, typename scalar_t>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, int64_t j0, int n, scalar_t (&x)[N]) {
  if (kVec && n == N) {
    const Pack<scalar_t, N> v = *reinterpret_cast<const Pack<scalar_t, N>*>(ptr + j0);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = v.v[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = i < n ? ptr[j0 + i] : scalar_t(0);
  }
}

// The logits as acc_t; padding lanes and the excluded class g become -inf (probability 0).
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void to_acc(const scalar_t (&x)[N], int64_t j0, int n, int64_t g, acc_t (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = (i < n && j0 + i != g) ? static_cast<acc_t>(x[i]) : neg_inf<acc_t>();
}

template <int N, bool kVec, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* ptr, int64_t j0, int n, const scalar_t (&x)[N]) {
  if (kVec && n == N) {
    Pack<scalar_t, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = x[i];
    *reinterpret_cast<Pack<scalar_t, N>*>(ptr + j0) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {  // unrolled: x stays in registers (no dynamic indexing)
      if (i < n) ptr[j0 + i] = x[i];
    }
  }
}

// The statistics pass of a block over classes [lo, hi) of a row, threads striding over
// N-wide packs; with kCache the packs are also kept in shared memory (at j - lo). The
// merged statistics are valid in thread 0.
template <typename Family, int N, bool kVec, bool kCache, typename scalar_t, typename acc_t>
__device__ __forceinline__ typename Family::template Accum<acc_t> stats_pass(const Params<scalar_t, acc_t>& p,
                                                                             const scalar_t* sr, const scalar_t* tr,
                                                                             int64_t lo, int64_t hi, int64_t g,
                                                                             scalar_t* s_cache, scalar_t* t_cache) {
  using Accum = typename Family::template Accum<acc_t>;
  Accum acc = Accum::empty();
  for (int64_t j0 = lo + int64_t(threadIdx.x) * N; j0 < hi; j0 += int64_t(blockDim.x) * N) {
    const int n = static_cast<int>(imin(N, hi - j0));
    scalar_t rs[N], rt[N];
    load_pack<N, kVec>(sr, j0, n, rs);
    load_pack<N, kVec>(tr, j0, n, rt);
    if (kCache) {
      store_pack<N, kVec>(s_cache, j0 - lo, n, rs);
      store_pack<N, kVec>(t_cache, j0 - lo, n, rt);
    }
    acc_t xs[N], xt[N];
    to_acc(rs, j0, n, g, xs);
    to_acc(rt, j0, n, g, xt);
    acc.add(xs, xt, n, p);
  }
  return block_merge(acc, p);
}

// The sum of a pair over the block (valid in thread 0).
template <typename acc_t>
__device__ void block_sum2(acc_t& x, acc_t& y) {
  __shared__ acc_t warp_x[32], warp_y[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffff, x, offset);
    y += __shfl_xor_sync(0xffffffff, y, offset);
  }
  if (lane == 0) {
    warp_x[warp] = x;
    warp_y[warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = lane < (blockDim.x + 31) / 32 ? warp_x[lane] : acc_t(0);
    y = lane < (blockDim.x + 31) / 32 ? warp_y[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      x += __shfl_xor_sync(0xffffffff, x, offset);
      y += __shfl_xor_sync(0xffffffff, y, offset);
    }
  }
  __syncthreads();
}

// JSD and TVD: the block's share of the loss and of W over classes [lo, hi), from
// s_src[j - src_lo], t_src[j - src_lo]; block-summed (valid in thread 0).
template <int N, bool kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void loss_pass(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f,
                                          const scalar_t* s_src, const scalar_t* t_src, int64_t src_lo, int64_t lo,
                                          int64_t hi, acc_t& loss, acc_t& total_w) {
  loss = total_w = acc_t(0);
  for (int64_t j0 = lo + int64_t(threadIdx.x) * N; j0 < hi; j0 += int64_t(blockDim.x) * N) {
    const int n = static_cast<int>(imin(N, hi - j0));
    scalar_t rs[N], rt[N];
    load_pack<N, kVec>(s_src, j0 - src_lo, n, rs);
    load_pack<N, kVec>(t_src, j0 - src_lo, n, rt);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      if (q < n) {
        acc_t l, w, ps;
        LLMDivergences::class_share(p, f, static_cast<acc_t>(rs[q]), static_cast<acc_t>(rt[q]), l, w, ps);
        loss += l;
        total_w += w;
      }
    }
  }
  block_sum2(loss, total_w);
}

// The gradient pass of a block over classes [lo, hi): grad_j from the logits at
// s_src[j - src_lo], t_src[j - src_lo] (the row itself, or the block's cache of it).
template <typename Family, int N, bool kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void grad_pass(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f,
                                          const scalar_t* s_src, const scalar_t* t_src, int64_t src_lo,
                                          scalar_t* gr, int64_t lo, int64_t hi) {
  for (int64_t j0 = lo + int64_t(threadIdx.x) * N; j0 < hi; j0 += int64_t(blockDim.x) * N) {
    const int n = static_cast<int>(imin(N, hi - j0));
    scalar_t rs[N], rt[N];
    load_pack<N, kVec>(s_src, j0 - src_lo, n, rs);
    load_pack<N, kVec>(t_src, j0 - src_lo, n, rt);
    acc_t xs[N], xt[N];
    to_acc(rs, j0, n, -1, xs);
    to_acc(rt, j0, n, -1, xt);
    scalar_t o[N];
#pragma unroll
    for (int q = 0; q < N; ++q) o[q] = static_cast<scalar_t>(grad_value<Family>(p, f, xs[q], xt[q], j0 + q));
    store_pack<N, kVec>(gr, j0, n, o);
  }
}

// Thread 0 of a row's (first) block: the loss of an ignored row (0) or of a row with an
// invalid label (NaN).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_skipped_row(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& status,
                                                  int64_t out) {
  p.row_loss[out] = status.state == 1 ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
}

// Thread 0: the loss of a row from the loss pass's sum (JSD, TVD).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_summed_loss(const Params<scalar_t, acc_t>& p, const RowFinish<acc_t>& f,
                                                  acc_t loss, int64_t out) {
  p.row_loss[out] =
      f.state == 2 ? std::numeric_limits<acc_t>::quiet_NaN() : divergence_loss_scale(p.div, p.T) * loss;
}

// Most threads a block of these kernels is launched with (softmax_kl_max_threads).
template <typename acc_t>
constexpr int max_block_threads() {
  return sizeof(acc_t) == 8 ? 512 : 1024;
}

// One block per row; classes contiguous. kCache: the row stays in shared memory between
// the statistics pass and the later passes.
template <typename Family, typename scalar_t, typename acc_t, bool kVec, bool kCache>
__global__ void __launch_bounds__(max_block_threads<acc_t>(), 1) softmax_kl_rows_kernel(Params<scalar_t, acc_t> p) {
  constexpr int N = kVec ? 16 / sizeof(scalar_t) : 1;
  extern __shared__ __align__(16) unsigned char cache_bytes[];
  scalar_t* s_cache = reinterpret_cast<scalar_t*>(cache_bytes);
  scalar_t* t_cache = s_cache + (kCache ? p.V : 0);
  __shared__ RowFinish<acc_t> shared_finish;

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t a = r / p.I, i = r % p.I;
    const scalar_t* sr = p.s + a * p.s_sa + i * p.s_si;
    const scalar_t* tr = p.t + a * p.t_sa + i * p.t_si;
    const scalar_t* s_src = kCache ? s_cache : sr;
    const scalar_t* t_src = kCache ? t_cache : tr;
    const int64_t out = a * p.r_sa + i * p.r_si;
    const RowFinish<acc_t> status = row_status(p, out);
    if (status.state == 0) {
      const auto acc = stats_pass<Family, N, kVec, kCache>(p, sr, tr, 0, p.V, status.g, s_cache, t_cache);
      if (threadIdx.x == 0) shared_finish = Family::finish(p, acc, status, sr, tr, out, true);
      if constexpr (Family::kLossPass) {
        __syncthreads();
        if (Family::needs_loss_pass(p)) {
          const RowFinish<acc_t> f = shared_finish;
          acc_t loss, total_w;
          loss_pass<N, kVec>(p, f, s_src, t_src, 0, 0, p.V, loss, total_w);
          if (threadIdx.x == 0) {
            shared_finish.b = total_w;
            write_summed_loss(p, f, loss, out);
          }
        }
      }
    } else if (threadIdx.x == 0) {
      write_skipped_row(p, status, out);
      shared_finish = status;
    }
    __syncthreads();
    const RowFinish<acc_t> f = shared_finish;
    if (p.grad != nullptr) grad_pass<Family, N, kVec>(p, f, s_src, t_src, 0, p.grad + a * p.g_sa + i * p.g_si, 0, p.V);
    __syncthreads();  // shared_finish and the cache are rewritten by the next row
  }
}

// sm_90: a row split over a cluster of `cluster` blocks, each caching a slice of `slice`
// classes (a multiple of the vector width) in shared memory; the blocks merge their
// statistics (and JSD's, TVD's sums of the loss and W) through distributed shared memory.
template <typename Family, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(max_block_threads<acc_t>(), 1)
    softmax_kl_cluster_kernel(Params<scalar_t, acc_t> p, int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using Accum = typename Family::template Accum<acc_t>;
  constexpr int N = 16 / sizeof(scalar_t);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), blocks = cluster.num_blocks();
  extern __shared__ __align__(16) unsigned char cache_bytes[];
  scalar_t* s_cache = reinterpret_cast<scalar_t*>(cache_bytes);
  scalar_t* t_cache = s_cache + slice;
  __shared__ Accum block_stats;   // read by the other blocks of the cluster
  __shared__ acc_t block_sums[2];  // (loss, W), likewise
  __shared__ RowFinish<acc_t> shared_finish;

  const int64_t r = blockIdx.x / blocks;
  const int64_t a = r / p.I, i = r % p.I;
  const scalar_t* sr = p.s + a * p.s_sa + i * p.s_si;
  const scalar_t* tr = p.t + a * p.t_sa + i * p.t_si;
  const int64_t out = a * p.r_sa + i * p.r_si;
  const int64_t lo = rank * slice, hi = imin(p.V, lo + slice);
  const RowFinish<acc_t> status = row_status(p, out);  // uniform over the cluster
  if (status.state == 0) {
    const Accum acc = stats_pass<Family, N, true, true>(p, sr, tr, lo, hi, status.g, s_cache, t_cache);
    if (threadIdx.x == 0) block_stats = acc;
    cluster.sync();  // every block's statistics are visible to the cluster
    if (threadIdx.x == 0) {
      Accum total = Accum::empty();
      for (unsigned b = 0; b < blocks; ++b) total.merge(*cluster.map_shared_rank(&block_stats, b), p);
      shared_finish = Family::finish(p, total, status, sr, tr, out, rank == 0);
    }
    if constexpr (Family::kLossPass) {
      __syncthreads();
      if (Family::needs_loss_pass(p)) {
        const RowFinish<acc_t> f = shared_finish;
        acc_t loss, total_w;
        loss_pass<N, true>(p, f, s_cache, t_cache, lo, lo, hi, loss, total_w);
        if (threadIdx.x == 0) {
          block_sums[0] = loss;
          block_sums[1] = total_w;
        }
        cluster.sync();
        if (threadIdx.x == 0) {
          acc_t row_loss = 0, row_w = 0;
          for (unsigned b = 0; b < blocks; ++b) {
            const acc_t* sums = cluster.map_shared_rank(block_sums, b);
            row_loss += sums[0];
            row_w += sums[1];
          }
          shared_finish.b = row_w;
          if (rank == 0) write_summed_loss(p, f, row_loss, out);
        }
      }
    }
    cluster.sync();  // no block leaves while another may still read its shared memory
  } else if (threadIdx.x == 0) {
    if (rank == 0) write_skipped_row(p, status, out);
    shared_finish = status;
  }
  __syncthreads();
  const RowFinish<acc_t> f = shared_finish;
  if (p.grad != nullptr) {
    grad_pass<Family, N, true>(p, f, s_cache, t_cache, lo, p.grad + a * p.g_sa + i * p.g_si, lo, hi);
  }
#endif
}

constexpr int kColumnsThreads = 256;

// One thread per row; neighbouring threads take neighbouring rows (stride_i == 1).
template <typename Family, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColumnsThreads) softmax_kl_columns_kernel(Params<scalar_t, acc_t> p) {
  using Accum = typename Family::template Accum<acc_t>;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < p.rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t a = r / p.I, i = r % p.I;
    const scalar_t* sr = p.s + a * p.s_sa + i * p.s_si;
    const scalar_t* tr = p.t + a * p.t_sa + i * p.t_si;
    const int64_t out = a * p.r_sa + i * p.r_si;
    RowFinish<acc_t> f = row_status(p, out);
    if (f.state == 0) {
      Accum acc = Accum::empty();
      for (int64_t j = 0; j < p.V; ++j) {
        acc_t xs[1] = {static_cast<acc_t>(sr[j * p.s_sv])}, xt[1] = {static_cast<acc_t>(tr[j * p.t_sv])};
        if (j == f.g) xs[0] = xt[0] = neg_inf<acc_t>();
        acc.add(xs, xt, 1, p);
      }
      f = Family::finish(p, acc, f, sr, tr, out, true);
      if constexpr (Family::kLossPass) {
        if (Family::needs_loss_pass(p)) {
          acc_t loss = 0, total_w = 0;
          for (int64_t j = 0; j < p.V; ++j) {
            acc_t l, w, ps;
            LLMDivergences::class_share(p, f, static_cast<acc_t>(sr[j * p.s_sv]), static_cast<acc_t>(tr[j * p.t_sv]),
                                        l, w, ps);
            loss += l;
            total_w += w;
          }
          f.b = total_w;
          write_summed_loss(p, f, loss, out);
        }
      }
    } else {
      write_skipped_row(p, f, out);
    }
    if (p.grad == nullptr) continue;
    scalar_t* gr = p.grad + a * p.g_sa + i * p.g_si;
    for (int64_t j = 0; j < p.V; ++j) {
      const acc_t xs = static_cast<acc_t>(sr[j * p.s_sv]), xt = static_cast<acc_t>(tr[j * p.t_sv]);
      gr[j * p.g_sv] = static_cast<scalar_t>(grad_value<Family>(p, f, xs, xt, j));
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Thread-block clusters allowed (turned off by softmax_kl_allow_clusters, or after a
// cluster launch failed on this device).
std::atomic<bool> g_allow_clusters{true};
std::atomic<uint64_t> g_cluster_failed_devices{0};

struct KernelLimits {
  int64_t static_smem;   // cudaFuncAttributes::sharedSizeBytes
  int64_t max_dynamic;   // the dynamic shared memory it may be given (its attribute is set to it)
};

// Once per kernel and device: the kernel's static shared memory, and its dynamic limit
// raised to what the plan may ask for (static + dynamic within the opt-in limit).
KernelLimits kernel_limits(const void* kernel, int device, int64_t smem_optin) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelLimits> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find({kernel, device});
  if (it != known.end()) return it->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const KernelLimits limits{static_cast<int64_t>(attributes.sharedSizeBytes),
                            softmax_kl_dynamic_limit(smem_optin, attributes.sharedSizeBytes)};
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(limits.max_dynamic)));
  known.emplace(std::make_pair(kernel, device), limits);
  return limits;
}

struct DeviceInfo {
  int device, major, smem_optin;
};

DeviceInfo device_info() {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(device);
  if (it != known.end()) return it->second;
  DeviceInfo info{device, 0, 0};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  known.emplace(device, info);
  return info;
}

// The kernels of one family (ForwardKL, LLMDivergences), for the launch plan and the launcher.
template <typename scalar_t, typename acc_t>
struct KernelFamily {
  void (*rows[2][2])(Params<scalar_t, acc_t>);  // [vec][cache]
  void (*cluster)(Params<scalar_t, acc_t>, int64_t);
  void (*columns)(Params<scalar_t, acc_t>);
};

template <typename scalar_t, typename acc_t>
SoftmaxKLLimits limits_for(const DeviceInfo& dev, bool vec, const KernelFamily<scalar_t, acc_t>& family) {
  const void* cached = reinterpret_cast<const void*>(family.rows[vec][true]);
  const void* cluster = reinterpret_cast<const void*>(family.cluster);
  SoftmaxKLLimits d;
  d.cc_major = dev.major;
  d.smem_optin = dev.smem_optin;
  d.rows_static_smem = kernel_limits(cached, dev.device, dev.smem_optin).static_smem;
  d.clusters = dev.major >= 9 && g_allow_clusters.load() &&
               !(g_cluster_failed_devices.load() >> (dev.device % 64) & 1);
  d.cluster_static_smem = d.clusters ? kernel_limits(cluster, dev.device, dev.smem_optin).static_smem : 0;
  return d;
}

// 16-byte loads: every row starts 16-byte aligned (the stride of a dim of extent 1 is
// never used, e.g. the leading dim of a plain [N, V]).
template <typename scalar_t>
bool vectorizable(const ClassDimView& sv, const ClassDimView& tv, const ClassDimView* gv, const void* s,
                  const void* t, const void* grad) {
  constexpr int64_t N = 16 / sizeof(scalar_t);
  const auto fits = [&](const ClassDimView& v) {
    return (v.A == 1 || v.stride_a % N == 0) && (v.I == 1 || v.stride_i % N == 0);
  };
  return sv.V % N == 0 && fits(sv) && fits(tv) && aligned16(s) && aligned16(t) &&
         (gv == nullptr || (fits(*gv) && aligned16(grad)));
}

template <typename Family, typename scalar_t, typename acc_t>
KernelFamily<scalar_t, acc_t> kernels_of() {
  KernelFamily<scalar_t, acc_t> f;
  f.rows[0][0] = softmax_kl_rows_kernel<Family, scalar_t, acc_t, false, false>;
  f.rows[0][1] = softmax_kl_rows_kernel<Family, scalar_t, acc_t, false, true>;
  f.rows[1][0] = softmax_kl_rows_kernel<Family, scalar_t, acc_t, true, false>;
  f.rows[1][1] = softmax_kl_rows_kernel<Family, scalar_t, acc_t, true, true>;
  f.cluster = softmax_kl_cluster_kernel<Family, scalar_t, acc_t>;
  f.columns = softmax_kl_columns_kernel<Family, scalar_t, acc_t>;
  return f;
}

template <typename scalar_t>
Params<scalar_t, at::opmath_type<scalar_t>> make_params(const SoftmaxKLProblem& pr, const at::Tensor& scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const ClassDimView &sv = pr.view, &tv = pr.t_view, &gv = pr.grad_view;
  Params<scalar_t, acc_t> p;
  p.s = pr.s.const_data_ptr<scalar_t>();
  p.t = pr.t.const_data_ptr<scalar_t>();
  p.grad = pr.compute_grad ? pr.grad.mutable_data_ptr<scalar_t>() : nullptr;
  p.target = pr.target.defined() ? pr.target.const_data_ptr<int64_t>() : nullptr;
  p.row_loss = pr.row_loss.mutable_data_ptr<acc_t>();
  p.scale = scale.const_data_ptr<double>();
  p.V = sv.V;
  p.I = sv.I;
  p.rows = sv.A * sv.I;
  p.s_sa = sv.stride_a, p.s_si = sv.stride_i, p.s_sv = sv.stride_v;
  p.t_sa = tv.stride_a, p.t_si = tv.stride_i, p.t_sv = tv.stride_v;
  p.g_sa = gv.stride_a, p.g_si = gv.stride_i, p.g_sv = gv.stride_v;
  p.r_sa = sv.row_stride_a, p.r_si = sv.row_stride_i;
  p.T = static_cast<acc_t>(pr.T);
  p.inv_T = static_cast<acc_t>(1.0 / pr.T);
  p.k = static_cast<acc_t>(1.4426950408889634 / pr.T);  // log2(e) / T
  p.alpha = static_cast<acc_t>(pr.alpha);
  p.beta = static_cast<acc_t>(pr.beta);
  p.ignore_index = pr.ignore_index;
  p.decoupled = pr.decoupled;
  p.div = pr.divergence;
  p.jsd_beta = static_cast<acc_t>(pr.jsd_beta);
  p.jsd_one_minus_beta = static_cast<acc_t>(1.0 - pr.jsd_beta);
  return p;
}

template <typename scalar_t, typename acc_t>
void launch(const SoftmaxKLProblem& pr, const Params<scalar_t, acc_t>& p, const KernelFamily<scalar_t, acc_t>& family) {
  const ClassDimView &sv = pr.view, &tv = pr.t_view, &gv = pr.grad_view;
  if (p.rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();

  if (pr.layout == KernelLayout::Columns) {
    const int64_t blocks = std::min<int64_t>((p.rows + kColumnsThreads - 1) / kColumnsThreads, 1 << 20);
    family.columns<<<blocks, kColumnsThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool vec = vectorizable<scalar_t>(sv, tv, p.grad == nullptr ? nullptr : &gv, p.s, p.t, p.grad);
  const DeviceInfo dev = device_info();
  const SoftmaxKLPlan plan =
      plan_softmax_kl_rows(p.V, sizeof(scalar_t), sizeof(acc_t) == 8, vec, limits_for(dev, vec, family));
  const int64_t blocks = std::min<int64_t>(p.rows, int64_t(1) << 30);

  if (plan.path == SoftmaxKLPath::Cluster) {
    auto kernel = family.cluster;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(p.rows * plan.cluster));
    config.blockDim = dim3(static_cast<unsigned>(plan.threads));
    config.dynamicSmemBytes = plan.dynamic_smem;
    config.stream = stream;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int active = 0;
    if (p.rows * plan.cluster < (int64_t(1) << 31) &&
        cudaOccupancyMaxActiveClusters(&active, kernel, &config) == cudaSuccess && active > 0 &&
        cudaLaunchKernelEx(&config, kernel, p, plan.slice) == cudaSuccess) {
      return;
    }
    // Clusters unavailable here (e.g. a MIG slice): the rows kernel reads through L2, now
    // and for the rest of the process on this device.
    (void)cudaGetLastError();
    if (p.rows * plan.cluster < (int64_t(1) << 31)) g_cluster_failed_devices.fetch_or(uint64_t(1) << (dev.device % 64));
  }
  if (plan.path == SoftmaxKLPath::RowsCached) {
    family.rows[vec][true]<<<blocks, plan.threads, plan.dynamic_smem, stream>>>(p);
  } else {
    const int64_t threads = softmax_kl_threads(vec ? p.V / (16 / sizeof(scalar_t)) : p.V,
                                               softmax_kl_max_threads(sizeof(acc_t) == 8));
    family.rows[vec][false]<<<blocks, threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel path a call of softmax_kl with these inputs takes on the current device (the
// same decision as launch): "columns", "rows-cached", "rows-uncached", "cluster-N", with
// "-scalar" when the rows cannot be read in 16-byte vectors.
std::string softmax_kl_path_cuda(const at::Tensor& s, const at::Tensor& t, int64_t dim, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(s.device());
  dim = dim < 0 ? dim + s.dim() : dim;
  KDFAST_CHECK(s.sizes() == t.sizes() && dim >= 0 && dim < s.dim(), "softmax_kl_path: bad inputs");
  // The views prepare_softmax_kl takes (a contiguous copy when s cannot be used as it is).
  const at::Tensor meta = at::empty_like(s, s.options().device(at::kMeta));
  ClassDimView sv = class_dim_view(s, dim);
  KernelLayout layout = sv.stride_v == 1 ? KernelLayout::Rows : KernelLayout::Columns;
  const bool copied = !fits_layout(sv, layout) || !fits_layout(class_dim_view(meta, dim), layout);
  const at::Tensor layout_of_s = copied ? at::empty(s.sizes(), meta.options()) : s;
  if (copied) {
    sv = class_dim_view(layout_of_s, dim);
    layout = sv.stride_v == 1 ? KernelLayout::Rows : KernelLayout::Columns;
  }
  if (layout == KernelLayout::Columns) return "columns";
  const bool t_copied = !fits_layout(class_dim_view(t, dim), layout);
  const ClassDimView tv = t_copied ? sv : class_dim_view(t, dim);
  std::string name;
  KDFAST_DISPATCH_FLOATING(s.scalar_type(), "softmax_kl_path", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Fresh allocations (copies, the gradient) are 16-byte aligned.
    const bool vec = vectorizable<scalar_t>(sv, tv, compute_grad ? &sv : nullptr,
                                            copied ? nullptr : s.const_data_ptr(),
                                            t_copied ? nullptr : t.const_data_ptr(), nullptr);
    const DeviceInfo dev = device_info();
    const SoftmaxKLPlan plan = plan_softmax_kl_rows(sv.V, sizeof(scalar_t), sizeof(acc_t) == 8, vec,
                                                    limits_for(dev, vec, kernels_of<ForwardKL, scalar_t, acc_t>()));
    name = softmax_kl_path_name(plan, vec);
  });
  return name;
}

// Turns thread-block clusters on or off (tests of the fallback); returns the previous setting.
bool softmax_kl_allow_clusters(bool allow) { return g_allow_clusters.exchange(allow); }

std::tuple<at::Tensor, at::Tensor> softmax_kl_cuda(const at::Tensor& s, const at::Tensor& t,
                                                   const std::optional<at::Tensor>& target,
                                                   const at::Tensor& scale, int64_t dim, double T,
                                                   int64_t ignore_index, double alpha, double beta,
                                                   bool decoupled, bool compute_grad, c10::string_view divergence,
                                                   double jsd_beta) {
  const c10::cuda::CUDAGuard guard(s.device());
  KDFAST_CHECK(scale.is_cuda() && scale.scalar_type() == at::kDouble && scale.numel() == 1,
               "softmax_kl: scale must be a float64 scalar on the GPU");
  SoftmaxKLProblem p =
      prepare_softmax_kl(s, t, target, dim, T, ignore_index, alpha, beta, decoupled, compute_grad);
  set_divergence(p, divergence, jsd_beta);
  KDFAST_DISPATCH_FLOATING(p.s.scalar_type(), "softmax_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<scalar_t, acc_t> params = make_params<scalar_t>(p, scale);
    if (p.divergence == Divergence::ForwardKL) {
      launch(p, params, kernels_of<ForwardKL, scalar_t, acc_t>());
    } else {
      launch(p, params, kernels_of<LLMDivergences, scalar_t, acc_t>());
    }
  });
  return {p.row_loss, p.grad};
}

// ---------------------------------------------------------------------------------------
// Sparse (top-k) teachers (csrc/softmax_kl_math.h): one block per row at a time. A bitmap in
// global memory (one per block, reused row after row) marks the row's top-k classes: an
// index out of range or repeated gives the row NaN; the tail (bucket) is summed online over
// the unmarked classes on its own maximum; the coarse (k+1)-class problem gives the loss and
// W; the gradient is written over the row, then scattered over K. The student row is read
// twice (statistics, gradient: bucket) or not at all beyond K (renormalize); the teacher
// in O(k).

template <typename scalar_t, typename acc_t>
struct TopKParams {
  const scalar_t* s;
  const int64_t* idx;
  const acc_t* lp;
  scalar_t* grad;            // nullptr: no gradient
  const int64_t* target;     // nullptr: no target
  acc_t* row_loss;
  const double* scale;
  uint32_t* bitmap;          // gridDim.x x words
  int64_t rows, V, k, words, s_sr;
  acc_t T, k2, inv_T, jsd_beta, jsd_one_minus_beta;  // k2 = log2(e) / T
  int64_t ignore_index;
  Divergence div;
  bool renormalize;
};

// Block-wide reductions (valid in every thread): sums, maxima, and the maximum with the
// smallest index holding it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t x) {
  __shared__ acc_t partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < (blockDim.x + 31) / 32 ? partial[lane] : acc_t(0);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  __syncthreads();
  return x;
}

template <typename acc_t>
__device__ void block_argmax(acc_t& x, int64_t& at) {
  __shared__ acc_t partial[32];
  __shared__ int64_t partial_at[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const auto take = [&](acc_t y, int64_t y_at) {
    if (y > x || (y == x && y_at < at)) {
      x = y;
      at = y_at;
    }
  };
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    take(__shfl_xor_sync(0xffffffff, x, offset), __shfl_xor_sync(0xffffffff, at, offset));
  }
  if (lane == 0) {
    partial[warp] = x;
    partial_at[warp] = at;
  }
  __syncthreads();
  x = neg_inf<acc_t>();
  at = std::numeric_limits<int64_t>::max();
  if (lane < (blockDim.x + 31) / 32) take(partial[lane], partial_at[lane]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    take(__shfl_xor_sync(0xffffffff, x, offset), __shfl_xor_sync(0xffffffff, at, offset));
  }
  __syncthreads();
}

// A running (maximum, sum of exp((x - m)/T)) over some classes.
template <typename acc_t>
struct OnlineSum {
  acc_t m, z;
  __device__ void add(acc_t x, acc_t k2) {
    if (x > m) {
      z *= rescale(m, x, k2);
      m = x;
    }
    if (m != neg_inf<acc_t>()) z += exp2_((x - m) * k2);
  }
  __device__ void merge(const OnlineSum& o, acc_t k2) {
    const acc_t mm = o.m > m ? o.m : m;
    z = z * rescale(m, mm, k2) + o.z * rescale(o.m, mm, k2);
    m = mm;
  }
};

template <typename acc_t>
__device__ OnlineSum<acc_t> block_online(OnlineSum<acc_t> r, acc_t k2) {
  __shared__ OnlineSum<acc_t> partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const auto shfl = [&](int offset) {
    OnlineSum<acc_t> o{__shfl_xor_sync(0xffffffff, r.m, offset), __shfl_xor_sync(0xffffffff, r.z, offset)};
    r.merge(o, k2);
  };
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) shfl(offset);
  if (lane == 0) partial[warp] = r;
  __syncthreads();
  r = lane < (blockDim.x + 31) / 32 ? partial[lane] : OnlineSum<acc_t>{neg_inf<acc_t>(), 0};
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) shfl(offset);
  __syncthreads();
  return r;
}

__device__ __forceinline__ bool in_topk(const uint32_t* bits, int64_t j) { return (bits[j >> 5] >> (j & 31)) & 1u; }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512) softmax_kl_topk_kernel(TopKParams<scalar_t, acc_t> p) {
  using Ops = CudaOps<acc_t>;
  uint32_t* bits = p.bitmap + int64_t(blockIdx.x) * p.words;
  const acc_t scale = static_cast<acc_t>(*p.scale);
  const acc_t loss_scale = divergence_loss_scale(p.div, p.T);
  const acc_t grad_scale = divergence_grad_scale(p.div, p.T) * scale;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const scalar_t* sr = p.s + r * p.s_sr;
    const int64_t* ir = p.idx + r * p.k;
    const acc_t* lr = p.lp + r * p.k;
    const bool ignored = p.target != nullptr && p.target[r] == p.ignore_index;

    // The row's top-k classes in the bitmap; out of range or repeated: the row is NaN.
    for (int64_t w = threadIdx.x; w < p.words; w += blockDim.x) bits[w] = 0;
    __syncthreads();
    int bad = 0;
    for (int64_t c = threadIdx.x; c < p.k; c += blockDim.x) {
      const int64_t j = ir[c];
      if (j < 0 || j >= p.V) {
        bad = 1;
      } else {
        const uint32_t bit = 1u << (j & 31);
        if (atomicOr(&bits[j >> 5], bit) & bit) bad = 1;
      }
    }
    bad = __syncthreads_or(bad);

    // The student over K: its maximum and the teacher's log-probability there (the anchor);
    // renormalize: the teacher's maximum over K.
    acc_t m_k = neg_inf<acc_t>(), m_lp = neg_inf<acc_t>();
    int64_t arg = std::numeric_limits<int64_t>::max();
    for (int64_t c = threadIdx.x; c < p.k; c += blockDim.x) {
      const int64_t j = ir[c];
      if (j < 0 || j >= p.V) continue;
      const acc_t x = static_cast<acc_t>(sr[j]);
      if (x > m_k || (x == m_k && c < arg)) {
        m_k = x;
        arg = c;
      }
      m_lp = lr[c] > m_lp ? lr[c] : m_lp;
    }
    block_argmax(m_k, arg);
    int64_t unused = 0;
    block_argmax(m_lp, unused);
    // bucket: the tail, online over the classes outside K on its own maximum
    OnlineSum<acc_t> tail{neg_inf<acc_t>(), 0};
    if (!p.renormalize) {
      for (int64_t j = threadIdx.x; j < p.V; j += blockDim.x) {
        if (!in_topk(bits, j)) tail.add(static_cast<acc_t>(sr[j]), p.k2);
      }
      tail = block_online(tail, p.k2);
    }
    const acc_t m = m_k > tail.m ? m_k : tail.m;
    const acc_t ref = m == neg_inf<acc_t>() ? acc_t(0) : m;
    const acc_t ref_t = p.renormalize && m_lp != neg_inf<acc_t>() ? m_lp : acc_t(0);
    acc_t z_k = 0, z_t = 0;
    for (int64_t c = threadIdx.x; c < p.k; c += blockDim.x) {
      const int64_t j = ir[c];
      if (j >= 0 && j < p.V) z_k += exp2_((static_cast<acc_t>(sr[j]) - ref) * p.k2);
      z_t += exp2_((lr[c] - ref_t) * p.k2);
    }
    z_k = block_sum(z_k);
    z_t = block_sum(z_t);
    const acc_t z = z_k + tail.z * rescale(tail.m, ref, p.k2);
    const acc_t log_z = ::log(z);
    const acc_t log_z_t = p.renormalize ? ::log(z_t) : acc_t(0);  // bucket: logprobs are log p as stored
    const acc_t ref_tail = tail.m == neg_inf<acc_t>() ? acc_t(0) : tail.m;

    // The coarse problem's anchor: the student's most probable class of K, or the tail.
    acc_t ls_a = (m_k - ref) * p.inv_T - log_z;
    acc_t lt_a = arg < p.k ? (lr[arg] - ref_t) * p.inv_T - log_z_t : neg_inf<acc_t>();
    const bool has_tail = !p.renormalize && p.k < p.V;
    acc_t ls_tail = neg_inf<acc_t>(), lt_tail = neg_inf<acc_t>();
    if (has_tail) {
      ls_tail = (ref_tail - ref) * p.inv_T + ::log(tail.z) - log_z;
      lt_tail = topk_teacher_log_tail(z_t);
      if (ls_tail > ls_a) {
        ls_a = ls_tail;
        lt_a = lt_tail;
      }
    }
    const acc_t h_a =
        divergence_terms<Ops>(p.div, lt_a - ls_a, Ops::exp(ls_a), Ops::exp(lt_a), p.jsd_beta, p.jsd_one_minus_beta).h;

    // The loss and W over K, then the tail class.
    acc_t loss = 0, total_w = 0;
    for (int64_t c = threadIdx.x; c < p.k; c += blockDim.x) {
      const int64_t j = ir[c];
      if (j < 0 || j >= p.V) continue;
      const acc_t xs = static_cast<acc_t>(sr[j]) - ref, xt = lr[c] - ref_t;
      const acc_t ps = exp2_(xs * p.k2) / z, pt = exp2_(xt * p.k2) / (p.renormalize ? z_t : acc_t(1));
      const ClassTerms<acc_t> t = divergence_terms<Ops>(p.div, (xt - xs) * p.inv_T + (log_z - log_z_t), ps, pt,
                                                        p.jsd_beta, p.jsd_one_minus_beta);
      loss += t.loss;
      total_w += divergence_weight<Ops>(p.div, t, ps, h_a);
    }
    loss = block_sum(loss);
    total_w = block_sum(total_w);
    acc_t q_tail = 0, w_tail = 0;
    if (has_tail) {
      q_tail = Ops::exp(ls_tail);
      const ClassTerms<acc_t> t =
          divergence_terms<Ops>(p.div, lt_tail - ls_tail, q_tail, Ops::exp(lt_tail), p.jsd_beta, p.jsd_one_minus_beta);
      loss += t.loss;
      w_tail = divergence_weight<Ops>(p.div, t, q_tail, h_a);
      total_w += w_tail;
    }
    const bool nan_row = bad || (m - m == acc_t(0) && m * p.inv_T - m * p.inv_T != acc_t(0));
    if (threadIdx.x == 0) p.row_loss[r] = ignored ? acc_t(0) : (nan_row ? nan : loss_scale * loss);

    if (p.grad != nullptr) {
      scalar_t* gr = p.grad + r * p.V;
      // outside K: the tail's w_tail - q_tail W spread by the softmax within the tail (bucket)
      acc_t c_tail = tail.z > acc_t(0) ? grad_scale * (w_tail - q_tail * total_w) / tail.z : acc_t(0);
      if (nan_row) c_tail = nan;
      if (ignored) c_tail = 0;
      for (int64_t j = threadIdx.x; j < p.V; j += blockDim.x) {
        if (in_topk(bits, j) && !bad) continue;
        acc_t g = c_tail;
        if (!p.renormalize && !ignored) g = c_tail * exp2_((static_cast<acc_t>(sr[j]) - ref_tail) * p.k2);
        gr[j] = static_cast<scalar_t>(g);
      }
      for (int64_t c = threadIdx.x; c < p.k && !bad; c += blockDim.x) {
        const int64_t j = ir[c];
        acc_t g = 0;
        if (!ignored) {
          const acc_t xs = static_cast<acc_t>(sr[j]) - ref, xt = lr[c] - ref_t;
          const acc_t ps = exp2_(xs * p.k2) / z, pt = exp2_(xt * p.k2) / (p.renormalize ? z_t : acc_t(1));
          const ClassTerms<acc_t> t = divergence_terms<Ops>(p.div, (xt - xs) * p.inv_T + (log_z - log_z_t), ps, pt,
                                                            p.jsd_beta, p.jsd_one_minus_beta);
          g = nan_row ? nan : grad_scale * (divergence_weight<Ops>(p.div, t, ps, h_a) - ps * total_w);
        }
        gr[j] = static_cast<scalar_t>(g);
      }
    }
    __syncthreads();  // the bitmap is cleared for the next row only after every read
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_topk_cuda(const at::Tensor& s, const at::Tensor& indices,
                                                        const at::Tensor& logprobs,
                                                        const std::optional<at::Tensor>& target,
                                                        const at::Tensor& scale, double T, int64_t ignore_index,
                                                        c10::string_view divergence, double jsd_beta,
                                                        bool renormalize, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(s.device());
  KDFAST_CHECK(scale.is_cuda() && scale.scalar_type() == at::kDouble && scale.numel() == 1,
               "softmax_kl_topk: scale must be a float64 scalar on the GPU");
  const SoftmaxKLTopKProblem pr = prepare_softmax_kl_topk(s, indices, logprobs, target, T, ignore_index, divergence,
                                                          jsd_beta, renormalize, compute_grad);
  if (pr.rows == 0) return {pr.row_loss, pr.grad};
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(pr.rows, int64_t(4) * sms);
  const int64_t words = (pr.V + 31) / 32;
  const at::Tensor bitmap = at::empty({blocks, words}, s.options().dtype(at::kInt));
  KDFAST_DISPATCH_FLOATING(pr.s.scalar_type(), "softmax_kl_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TopKParams<scalar_t, acc_t> p;
    p.s = pr.s.const_data_ptr<scalar_t>();
    p.idx = pr.indices.const_data_ptr<int64_t>();
    p.lp = pr.logprobs.const_data_ptr<acc_t>();
    p.grad = pr.compute_grad ? pr.grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.target = pr.target.defined() ? pr.target.const_data_ptr<int64_t>() : nullptr;
    p.row_loss = pr.row_loss.mutable_data_ptr<acc_t>();
    p.scale = scale.const_data_ptr<double>();
    p.bitmap = reinterpret_cast<uint32_t*>(bitmap.mutable_data_ptr<int32_t>());
    p.rows = pr.rows;
    p.V = pr.V;
    p.k = pr.k;
    p.words = words;
    p.s_sr = pr.s_row_stride;
    p.T = static_cast<acc_t>(pr.T);
    p.k2 = static_cast<acc_t>(1.4426950408889634 / pr.T);
    p.inv_T = static_cast<acc_t>(1.0 / pr.T);
    p.jsd_beta = static_cast<acc_t>(pr.jsd_beta);
    p.jsd_one_minus_beta = static_cast<acc_t>(1.0 - pr.jsd_beta);
    p.ignore_index = pr.ignore_index;
    p.div = pr.divergence;
    p.renormalize = pr.renormalize;
    const int threads = pr.V >= 16384 ? 512 : 256;
    softmax_kl_topk_kernel<scalar_t, acc_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pr.row_loss, pr.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_cuda);
  m.impl("softmax_kl_topk", &softmax_kl_topk_cuda);
  m.impl("softmax_kl_path", &softmax_kl_path_cuda);
}

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  // Thread-block clusters for the softmax-KL rows of sm_90 on (the default) or off, to test
  // the rows kernel that runs where clusters cannot; returns the previous setting.
  m.def("softmax_kl_allow_clusters(bool allow) -> bool", &softmax_kl_allow_clusters);
}

}  // namespace kdfast
