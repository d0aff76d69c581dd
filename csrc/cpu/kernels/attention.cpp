// Fused attention transfer on the CPU (math: attention_math.h), compiled once per
// instruction set (csrc/cpu/dispatch.h).
//
// Forward, for all layer pairs of a step in one call:
//   1. channel means r = mean_c f^p of every student and teacher map, one sweep over each;
//   2. per sample, from r_s and r_t (a few KB, in cache): the loss and w = dL/dr_s, written
//      over r_s. The loss is the sum of per-sample losses in a fixed order (deterministic).
//   With enough samples a worker does both steps for whole samples (one parallel region);
//   with few, step 1 also splits the positions and step 2 follows in a second region.
// Backward: grad = (grad_loss p / C) w[b, x] f^(p-1), one read of f_s, one write of grad
// (non-temporal when the gradients outgrow the L2 caches).
// Three layouts, chosen per map: positions contiguous (NCHW: vectors run along x, a
// sample's channel rows are added into a row of accumulators in L1), channels contiguous
// (channels_last: vectors run along c, one horizontal sum per position), and any other
// strides (scalar).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "attention.h"
#include "cpu/dispatch.h"
#include "cpu/memory.h"
#include "cpu/vec.h"

namespace kdfast {
inline namespace CPU_CAPABILITY {
namespace {

// Exponents of the general power: e as a vector, and as an integer (or -1, see
// integer_power in attention_math.h).
template <typename Vec>
struct Exponent {
  Vec e;
  int e_int;
};

template <typename Vec>
Vec general_power(Vec f, const Exponent<Vec>& e) {
  if (e.e_int < 0) return f.pow(e.e);
  Vec r(1);
  for (int n = e.e_int; n > 0; n >>= 1) {
    if (n & 1) r = r * f;
    f = f * f;
  }
  return r;
}

// acc + f^p, vectorized.
template <AttentionPower P, typename Vec>
Vec add_power(const Vec& acc, const Vec& f, const Exponent<Vec>& p) {
  if constexpr (P == AttentionPower::Square) {
    return at::vec::fmadd(f, f, acc);
  } else {
    return acc + general_power(f, p);
  }
}

// f^(p-1)
template <AttentionPower P, typename Vec>
Vec power_grad(const Vec& f, const Exponent<Vec>& p_minus_1) {
  if constexpr (P == AttentionPower::Square) {
    return f;
  } else {
    return general_power(f, p_minus_1);
  }
}

enum class Layout {
  Positions,
  Channels,
  Strided,
};

// Positions contiguous is preferred when a row holds at least a vector.
template <typename acc_t>
Layout pick_layout(const FeatureView& a, const FeatureView& b) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  const bool x_ok = a.x_contiguous() && b.x_contiguous();
  const bool c_ok = a.c_contiguous() && b.c_contiguous();
  if (x_ok && (a.X >= K || !c_ok)) return Layout::Positions;
  if (c_ok) return Layout::Channels;
  return x_ok ? Layout::Positions : Layout::Strided;
}

// Runs run(k, i) for items i < items[k] of every task k on at::parallel_for's threads,
// splitting by cost (cost[k] per item of task k, e.g. elements read), not by count: layer
// pairs of different sizes would otherwise leave most of the work to one thread. The parts
// (16 a thread) are taken in turn (parallel_chunks): a descheduled thread holds nothing up.
template <typename Run>
void parallel_items(const std::vector<int64_t>& items, const std::vector<int64_t>& cost, const Run& run) {
  const size_t n = items.size();
  std::vector<int64_t> begin(n + 1, 0), cost_begin(n + 1, 0);
  for (size_t k = 0; k < n; ++k) {
    begin[k + 1] = begin[k] + items[k];
    cost_begin[k + 1] = cost_begin[k] + items[k] * cost[k];
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(begin[n], 16 * at::get_num_threads()));
  const auto first_item = [&](int64_t part) -> int64_t {  // of each part: equal shares of cost
    if (part >= parts) return begin[n];
    const int64_t target = static_cast<int64_t>(static_cast<double>(cost_begin[n]) * part / parts);
    const size_t k = std::upper_bound(cost_begin.begin(), cost_begin.end() - 1, target) - cost_begin.begin() - 1;
    return begin[k] + std::min(items[k], (target - cost_begin[k] + cost[k] - 1) / std::max<int64_t>(cost[k], 1));
  };
  parallel_chunks(parts, 1, [&](int64_t lo, int64_t hi) {
    const int64_t end = first_item(hi);
    int64_t i = first_item(lo);
    size_t k = std::upper_bound(begin.begin(), begin.end(), i) - begin.begin() - 1;
    for (; i < end; ++i) {
      while (i >= begin[k + 1]) ++k;
      run(k, i - begin[k]);
    }
  });
}

// ---- forward, step 1: channel means ---------------------------------------------------

// One map's share of the work: items are (sample, run of `chunk` positions).
struct MeanTask {
  const void* f;
  FeatureView v;
  void* out;  // [B, X] opmath
  Layout layout;
  int64_t chunk, items;
};

template <typename scalar_t, AttentionPower P>
void channel_mean_item(const MeanTask& t, int64_t item, at::opmath_type<scalar_t> p) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  const FeatureView& v = t.v;
  const scalar_t* f = static_cast<const scalar_t*>(t.f);
  const int64_t chunks = (v.X + t.chunk - 1) / t.chunk;
  const int64_t b = item / chunks, x0 = (item % chunks) * t.chunk;
  const int64_t nx = std::min(t.chunk, v.X - x0);
  acc_t* out = static_cast<acc_t*>(t.out) + b * v.X + x0;
  const acc_t inv_C = acc_t(1) / acc_t(v.C);
  const int p_int = integer_power(p);
  const Exponent<Vec> vp{Vec(p), p_int};

  if (t.layout == Layout::Channels) {
    for (int64_t j = 0; j < nx; ++j) {
      const scalar_t* row = f + v.offset(b, 0, x0 + j);
      Vec a0(0), a1(0);
      int64_t c = 0;
      for (; c + 2 * K <= v.C; c += 2 * K) {
        a0 = add_power<P>(a0, L::load(row + c), vp);
        a1 = add_power<P>(a1, L::load(row + c + K), vp);
      }
      for (; c < v.C; c += K) {
        const int64_t n = std::min(K, v.C - c);
        a0 = Vec::set(a0, add_power<P>(a0, L::load(row + c, n), vp), n);
      }
      out[j] = reduce_sum(a0 + a1) * inv_C;
    }
    return;
  }

  acc_t* acc = scratch<acc_t>(nx);
  std::fill(acc, acc + nx, acc_t(0));
  if (t.layout == Layout::Strided) {
    for (int64_t c = 0; c < v.C; ++c) {
      for (int64_t j = 0; j < nx; ++j) {
        acc[j] += attention_power_of<P>(static_cast<acc_t>(f[v.offset(b, c, x0 + j)]), p, p_int);
      }
    }
  } else {
    // Positions contiguous: add channel rows into the accumulators, eight rows a sweep
    // (two chains of four) so that the accumulators are loaded and stored once per eight
    // rows, and eight streams of the map are in flight (measured: 15% faster than four).
    const scalar_t* base = f + b * v.sb + x0;
    const int64_t sc = v.sc;
    int64_t c = 0;
    for (; c + 8 <= v.C; c += 8) {
      const scalar_t* r = base + c * sc;
      int64_t j = 0;
      for (; j + K <= nx; j += K) {
        Vec s0 = add_power<P>(Vec::loadu(acc + j), L::load(r + j), vp);
        Vec s1 = add_power<P>(Vec(0), L::load(r + sc + j), vp);
        s0 = add_power<P>(s0, L::load(r + 2 * sc + j), vp);
        s1 = add_power<P>(s1, L::load(r + 3 * sc + j), vp);
        s0 = add_power<P>(s0, L::load(r + 4 * sc + j), vp);
        s1 = add_power<P>(s1, L::load(r + 5 * sc + j), vp);
        s0 = add_power<P>(s0, L::load(r + 6 * sc + j), vp);
        s1 = add_power<P>(s1, L::load(r + 7 * sc + j), vp);
        (s0 + s1).store(acc + j);
      }
      if (const int64_t n = nx - j; n > 0) {
        Vec a = Vec::loadu(acc + j, n);
        for (int64_t k = 0; k < 8; ++k) a = add_power<P>(a, L::load(r + k * sc + j, n), vp);
        a.store(acc + j, n);
      }
    }
    for (; c < v.C; ++c) {
      const scalar_t* r = base + c * sc;
      for (int64_t j = 0; j < nx; j += K) {
        const int64_t n = std::min(K, nx - j);
        add_power<P>(Vec::loadu(acc + j, n), L::load(r + j, n), vp).store(acc + j, n);
      }
    }
  }
  for (int64_t j = 0; j < nx; ++j) out[j] = acc[j] * inv_C;
}

// Enough items for every thread (several each, for balance), each at least ~16K elements.
int64_t position_chunk(const FeatureView& v, Layout layout, int64_t vec, int64_t maps) {
  if (layout == Layout::Channels) return std::max<int64_t>(1, std::min(v.X, 16384 / v.C));
  int64_t chunk = std::min<int64_t>(v.X, 2048);
  const int64_t want = 4 * at::get_num_threads();
  if (v.B * maps * ((v.X + chunk - 1) / chunk) < want) {
    const int64_t per_sample = (want + v.B * maps - 1) / (v.B * maps);
    chunk = std::max<int64_t>(vec * 8, (v.X + per_sample - 1) / per_sample);
    chunk = std::min(v.X, (chunk + vec - 1) / vec * vec);
  }
  return chunk;
}

template <typename scalar_t, AttentionPower P>
void channel_means(const std::vector<MeanTask>& tasks, double p) {
  std::vector<int64_t> items, cost;
  for (const MeanTask& t : tasks) {
    items.push_back(t.items);
    cost.push_back(t.v.C * t.chunk);
  }
  parallel_items(items, cost, [&](size_t k, int64_t i) {
    channel_mean_item<scalar_t, P>(tasks[k], i, static_cast<at::opmath_type<scalar_t>>(p));
  });
}

// ---- forward, step 2: per-sample loss and w --------------------------------------------

// Sample b of pair i: w over r_s, and the sample's share of the loss.
template <typename acc_t>
void finish_sample(AttentionForwardProblem& prob, size_t i, int64_t b) {
  const int64_t B = prob.v_s[i].B, X = prob.v_s[i].X;
  acc_t* rs = prob.maps[i].mutable_data_ptr<acc_t>() + b * X;
  const acc_t* rt = prob.teacher_means[i].const_data_ptr<acc_t>() + b * X;
  acc_t ss_s = 0, ss_t = 0;
  for (int64_t x = 0; x < X; ++x) {
    ss_s += rs[x] * rs[x];
    ss_t += rt[x] * rt[x];
  }
  const auto nrm = attention_sample_norms(ss_s, ss_t);
  acc_t sum_d2 = 0, dot = 0;
  for (int64_t x = 0; x < X; ++x) {
    const acc_t a_s = rs[x] * nrm.inv_s, d = a_s - rt[x] * nrm.inv_t;
    sum_d2 += d * d;
    dot += a_s * d;
  }
  const acc_t n_elem = acc_t(B) * acc_t(X);
  const auto k = attention_map_coefs(nrm, dot, acc_t(2) / n_elem);
  for (int64_t x = 0; x < X; ++x) {
    const acc_t a_s = rs[x] * nrm.inv_s, d = a_s - rt[x] * nrm.inv_t;
    rs[x] = k.coef_d * d + k.coef_a * a_s;
  }
  prob.sample_loss.mutable_data_ptr<acc_t>()[prob.sample_begin[i] + b] = sum_d2 / n_elem;
}

template <typename scalar_t, AttentionPower P>
void attention_forward(AttentionForwardProblem& prob) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t K = Vectorized<acc_t>::size();
  const size_t pairs = prob.f_s.size();
  const int64_t samples = prob.sample_loss.numel();
  const acc_t p = static_cast<acc_t>(prob.p);
  auto mean_task = [&](const at::Tensor& f, const FeatureView& v, const at::Tensor& out, int64_t chunk) {
    MeanTask t{f.const_data_ptr(), v, out.mutable_data_ptr(), pick_layout<acc_t>(v, v), chunk, 0};
    t.items = v.B * ((v.X + chunk - 1) / chunk);
    return t;
  };
  if (samples >= 4 * at::get_num_threads()) {
    // Enough samples: one parallel region, a worker takes whole samples (both channel
    // means, then the finish while they are in cache).
    std::vector<MeanTask> tasks;
    for (size_t i = 0; i < pairs; ++i) {
      tasks.push_back(mean_task(prob.f_s[i], prob.v_s[i], prob.maps[i], prob.v_s[i].X));
      tasks.push_back(mean_task(prob.f_t[i], prob.v_t[i], prob.teacher_means[i], prob.v_t[i].X));
    }
    std::vector<int64_t> items, cost;
    for (size_t i = 0; i < pairs; ++i) {
      items.push_back(prob.v_s[i].B);
      cost.push_back((prob.v_s[i].C + prob.v_t[i].C) * prob.v_s[i].X);
    }
    parallel_items(items, cost, [&](size_t i, int64_t b) {
      channel_mean_item<scalar_t, P>(tasks[2 * i], b, p);
      channel_mean_item<scalar_t, P>(tasks[2 * i + 1], b, p);
      finish_sample<acc_t>(prob, i, b);
    });
    return;
  }
  // Few samples: split positions too, then finish the samples.
  std::vector<MeanTask> tasks;
  const int64_t maps = 2 * static_cast<int64_t>(pairs);
  for (size_t i = 0; i < pairs; ++i) {
    for (int side = 0; side < 2; ++side) {
      const FeatureView& v = side == 0 ? prob.v_s[i] : prob.v_t[i];
      const Layout layout = pick_layout<acc_t>(v, v);
      tasks.push_back(mean_task(side == 0 ? prob.f_s[i] : prob.f_t[i], v,
                                side == 0 ? prob.maps[i] : prob.teacher_means[i], position_chunk(v, layout, K, maps)));
    }
  }
  channel_means<scalar_t, P>(tasks, prob.p);
  std::vector<int64_t> items, cost;
  for (size_t i = 0; i < pairs; ++i) {
    items.push_back(prob.v_s[i].B);
    cost.push_back(prob.v_s[i].X);
  }
  parallel_items(items, cost, [&](size_t i, int64_t b) { finish_sample<acc_t>(prob, i, b); });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> attention_transfer_forward_cpu(
    at::TensorList f_s, at::TensorList f_t, double p) {
  AttentionForwardProblem prob = prepare_attention_forward(f_s.vec(), f_t.vec(), p);
  at::Tensor loss;
  KDFAST_DISPATCH_FLOATING(prob.f_s[0].scalar_type(), "attention_transfer_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (attention_power(p) == AttentionPower::Square) {
      attention_forward<scalar_t, AttentionPower::Square>(prob);
    } else {
      attention_forward<scalar_t, AttentionPower::General>(prob);
    }
    const acc_t* sample_loss = prob.sample_loss.const_data_ptr<acc_t>();
    acc_t total = 0;  // in a fixed order: the same loss for any number of threads
    for (int64_t s = 0; s < prob.sample_loss.numel(); ++s) total += sample_loss[s];
    loss = at::empty({}, prob.sample_loss.options());
    *loss.mutable_data_ptr<acc_t>() = total;
  });
  return {loss, prob.maps};
}

// ---- backward --------------------------------------------------------------------------

struct GradTask {
  const void* f;
  void* grad;
  const void* w;  // [B, X] opmath
  FeatureView vf, vg;
  Layout layout;
  int64_t chunk, items;  // items: (sample, run of `chunk` channels or positions)
  bool stream;           // non-temporal stores of the gradient
};

template <typename scalar_t, AttentionPower P>
void grad_item(const GradTask& t, int64_t item, at::opmath_type<scalar_t> coef,
               at::opmath_type<scalar_t> p_minus_1) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t K = L::kStep;
  const FeatureView &vf = t.vf, &vg = t.vg;
  const scalar_t* f = static_cast<const scalar_t*>(t.f);
  scalar_t* grad = static_cast<scalar_t*>(t.grad);
  const int64_t inner = t.layout == Layout::Channels ? vf.X : vf.C;  // what items split
  const int64_t chunks = (inner + t.chunk - 1) / t.chunk;
  const int64_t b = item / chunks, lo = (item % chunks) * t.chunk, hi = std::min(inner, lo + t.chunk);
  const acc_t* w = static_cast<const acc_t*>(t.w) + b * vf.X;
  const int pm1_int = integer_power(p_minus_1);
  const Exponent<Vec> vpm1{Vec(p_minus_1), pm1_int};

  if (t.layout == Layout::Channels) {  // items: runs of positions; vectors along c
    for (int64_t x = lo; x < hi; ++x) {
      const scalar_t* fr = f + vf.offset(b, 0, x);
      scalar_t* gr = grad + vg.offset(b, 0, x);
      const Vec k(w[x] * coef);
      int64_t c = 0;
      if (t.stream) {
        for (; c + K <= vf.C; c += K) L::store_stream(gr + c, k * power_grad<P>(L::load(fr + c), vpm1));
      }
      for (; c < vf.C; c += K) {
        const int64_t n = std::min(K, vf.C - c);
        L::store(gr + c, k * power_grad<P>(L::load(fr + c, n), vpm1), n);
      }
    }
    return;
  }
  // items: runs of channels
  acc_t* wk = scratch<acc_t>(vf.X);
  for (int64_t x = 0; x < vf.X; ++x) wk[x] = w[x] * coef;
  for (int64_t c = lo; c < hi; ++c) {
    if (t.layout == Layout::Strided) {
      for (int64_t x = 0; x < vf.X; ++x) {
        const acc_t fx = static_cast<acc_t>(f[vf.offset(b, c, x)]);
        grad[vg.offset(b, c, x)] = static_cast<scalar_t>(wk[x] * attention_power_grad<P>(fx, p_minus_1, pm1_int));
      }
      continue;
    }
    const scalar_t* fr = f + b * vf.sb + c * vf.sc;
    scalar_t* gr = grad + b * vg.sb + c * vg.sc;
    int64_t x = 0;
    if (t.stream) {
      for (; x + K <= vf.X; x += K) {
        L::store_stream(gr + x, Vec::loadu(wk + x) * power_grad<P>(L::load(fr + x), vpm1));
      }
    } else {
      for (; x + K <= vf.X; x += K) {
        L::store(gr + x, Vec::loadu(wk + x) * power_grad<P>(L::load(fr + x), vpm1));
      }
    }
    if (const int64_t n = vf.X - x; n > 0) {
      L::store(gr + x, Vec::loadu(wk + x, n) * power_grad<P>(L::load(fr + x, n), vpm1), n);
    }
  }
}

template <typename scalar_t, AttentionPower P>
void attention_grads(const std::vector<GradTask>& tasks, const std::vector<double>& coefs, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> items, cost;
  for (const GradTask& t : tasks) {
    items.push_back(t.items);
    cost.push_back(t.chunk * (t.layout == Layout::Channels ? t.vf.C : t.vf.X));
  }
  parallel_items(items, cost, [&](size_t k, int64_t i) {
    grad_item<scalar_t, P>(tasks[k], i, static_cast<acc_t>(coefs[k]), static_cast<acc_t>(p - 1));
    if (tasks[k].stream) stream_fence();
  });
}

std::vector<at::Tensor> attention_transfer_backward_cpu(const at::Tensor& grad_loss, at::TensorList f_s,
                                                        at::TensorList maps, double p) {
  AttentionBackwardProblem prob = prepare_attention_backward(f_s.vec(), maps.vec(), p, &empty_like_reused);
  KDFAST_CHECK(grad_loss.numel() == 1, "attention_transfer_backward: grad_loss must hold one value");
  const double go = grad_loss.item<double>();
  KDFAST_DISPATCH_FLOATING(prob.f_s[0].scalar_type(), "attention_transfer_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<GradTask> tasks;
    std::vector<double> coefs;
    // Gradients larger than the threads' L2 caches together are written with non-temporal
    // stores: no read of each destination line before it is written (a third of the
    // backward's traffic), and the caches keep what they held (e.g. the next maps).
    int64_t grad_bytes = 0;
    for (const at::Tensor& g : prob.out) grad_bytes += g.nbytes();
    const bool stream = stream_stores(grad_bytes, at::get_num_threads());
    for (size_t i = 0; i < prob.f_s.size(); ++i) {
      const FeatureView &vf = prob.v_f[i], &vg = prob.v_g[i];
      GradTask t{prob.f_s[i].const_data_ptr(), prob.out[i].mutable_data_ptr(), prob.maps[i].const_data_ptr(),
                 vf, vg, pick_layout<acc_t>(vf, vg), 1, 0, stream};
      if (t.layout == Layout::Channels) {
        t.chunk = std::max<int64_t>(1, std::min(vf.X, 32768 / vf.C));
        t.items = vf.B * ((vf.X + t.chunk - 1) / t.chunk);
      } else {
        t.chunk = std::max<int64_t>(1, std::min(vf.C, 32768 / vf.X));
        t.items = vf.B * ((vf.C + t.chunk - 1) / t.chunk);
      }
      tasks.push_back(t);
      coefs.push_back(go * p / static_cast<double>(vf.C));
    }
    if (attention_power(p) == AttentionPower::Square) {
      attention_grads<scalar_t, AttentionPower::Square>(tasks, coefs, p);
    } else {
      attention_grads<scalar_t, AttentionPower::General>(tasks, coefs, p);
    }
  });
  return finish_attention_backward(prob);
}

}  // namespace

extern const AttentionKernels kAttentionKernels;
const AttentionKernels kAttentionKernels{&attention_transfer_forward_cpu, &attention_transfer_backward_cpu};

}  // namespace CPU_CAPABILITY
}  // namespace kdfast
