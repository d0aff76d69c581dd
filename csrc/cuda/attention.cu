// Fused attention transfer on CUDA GPUs (math: attention_math.h).
//
// Forward, for all layer pairs of a step: one launch computes the channel means
// r = mean_c f^p of every student and teacher map (a block owns one sample and a tile of
// positions and walks all channels: each element is read once, with 16-byte loads and
// several in flight per thread), one launch finishes every sample (block per sample: the
// loss and w = d loss / d r_s over r_s; the sample's means stay in L1/L2), and at::sum
// adds the per-sample losses in a fixed order. Backward: one launch writes
// grad = grad_loss (p / C) w[b, x] f^(p-1) for every student map, reading f once.
// Layouts, chosen per map: positions contiguous (NCHW; vectors along x), channels
// contiguous (channels_last; vectors along c, a warp per position), and a scalar path
// for anything else (any strides, odd sizes, unaligned data).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"

namespace kdfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;     // 16-byte loads in flight per thread
constexpr int kMaxMaps = 16;   // feature maps per launch (more: several launches)
constexpr int kPositionsPerWarp = 4;  // channels-contiguous layout

enum class Layout {
  Positions,
  Channels,
  Scalar,
};

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / sizeof(scalar_t);
}

// 16 bytes as VEC elements.
template <typename scalar_t>
struct Pack {
  static constexpr int N = vec_size<scalar_t>();
  scalar_t v[N];
};

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_stream(const scalar_t* p) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));  // read once: evict first
  Pack<scalar_t> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ void store_stream(scalar_t* p, const Pack<scalar_t>& v) {
  uint4 raw;
  memcpy(&raw, &v, sizeof(raw));
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loads VEC consecutive opmath values (16-byte aligned) through the read-only cache, as
// float4 or double2 vectors.
template <int VEC, typename acc_t>
__device__ __forceinline__ void load_w(const acc_t* p, acc_t (&out)[VEC]) {
  using Vec16 = std::conditional_t<std::is_same_v<acc_t, float>, float4, double2>;
  constexpr int kLanes = sizeof(Vec16) / sizeof(acc_t);
  static_assert(VEC % kLanes == 0, "opmath maps load as 16-byte vectors");
#pragma unroll
  for (int i = 0; i < VEC / kLanes; ++i) {
    const Vec16 q = __ldg(reinterpret_cast<const Vec16*>(p) + i);
    memcpy(out + kLanes * i, &q, sizeof(q));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The maps (or pairs) of one launch, passed by value as a kernel parameter.
template <typename Entry>
struct Table {
  Entry entry[kMaxMaps];
  int n;
};

// The entry of a launch's table that block (or sample) `id` belongs to: entries own
// consecutive ranges starting at `begin`.
template <typename TableT>
__device__ __forceinline__ int find_entry(const TableT& table, int64_t id) {
  int k = 0;
  while (k + 1 < table.n && id >= table.entry[k + 1].begin) ++k;
  return k;
}

// ---- forward, step 1: channel means ----------------------------------------------------

struct MeanMap {
  const void* f;
  void* out;  // [B, X] opmath
  int64_t B, C, X, X2, sb, sc, sx1, sx2;
  int64_t tiles;  // blocks per sample
  int64_t begin;  // first block of this map in the launch
};

using MeanTable = Table<MeanMap>;

// Positions layout: a block owns (sample, 32 * VEC positions); warp w adds channels
// w, w + 8, ...; the 8 partial rows meet in shared memory. VEC == 1: scalar loads and
// general position strides.
template <typename scalar_t, AttentionPower P, int VEC>
__global__ void __launch_bounds__(kThreads)
    channel_mean_positions_kernel(const __grid_constant__ MeanTable table, double p_arg, int p_int) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TX = 32 * VEC;
  __shared__ acc_t partial[kWarps][TX];
  const int64_t block = blockIdx.x;
  const MeanMap& m = table.entry[find_entry(table, block)];
  const int64_t local = block - m.begin, b = local / m.tiles, x_tile = (local % m.tiles) * TX;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t x = x_tile + lane * VEC;
  const acc_t p = static_cast<acc_t>(p_arg);
  const scalar_t* f = static_cast<const scalar_t*>(m.f);
  acc_t acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
  if (x < m.X) {
    if constexpr (VEC > 1) {
      const scalar_t* base = f + b * m.sb + x;  // positions contiguous, X % VEC == 0
      for (int64_t c = warp; c < m.C; c += kWarps * kUnroll) {
        Pack<scalar_t> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t cc = c + u * kWarps;
          if (cc < m.C) {
            raw[u] = load_stream(base + cc * m.sc);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) raw[u].v[v] = scalar_t(0);  // 0^p = 0
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            acc[v] += attention_power_of<P>(static_cast<acc_t>(raw[u].v[v]), p, p_int);
          }
        }
      }
    } else {
      const scalar_t* base = f + b * m.sb + (x / m.X2) * m.sx1 + (x % m.X2) * m.sx2;
      for (int64_t c = warp; c < m.C; c += kWarps * kUnroll) {
        acc_t raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t cc = c + u * kWarps;
          raw[u] = cc < m.C ? static_cast<acc_t>(base[cc * m.sc]) : acc_t(0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) acc[0] += attention_power_of<P>(raw[u], p, p_int);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) partial[warp][lane * VEC + v] = acc[v];
  __syncthreads();
  for (int t = threadIdx.x; t < TX && x_tile + t < m.X; t += kThreads) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][t];
    static_cast<acc_t*>(m.out)[b * m.X + x_tile + t] = sum / static_cast<acc_t>(m.C);
  }
}

// Channels layout (channels_last): a warp owns kPositionsPerWarp positions and walks
// their contiguous channels together, VEC per lane; a block owns 8 warps' positions.
template <typename scalar_t, AttentionPower P>
__global__ void __launch_bounds__(kThreads)
    channel_mean_channels_kernel(const __grid_constant__ MeanTable table, double p_arg, int p_int) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr int kPositions = kWarps * kPositionsPerWarp;
  const int64_t block = blockIdx.x;
  const MeanMap& m = table.entry[find_entry(table, block)];
  const int64_t local = block - m.begin, b = local / m.tiles;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t x0 = (local % m.tiles) * kPositions + warp * kPositionsPerWarp;
  const acc_t p = static_cast<acc_t>(p_arg);
  const scalar_t* f = static_cast<const scalar_t*>(m.f) + b * m.sb;
  const scalar_t* row[kPositionsPerWarp];
  acc_t acc[kPositionsPerWarp];
#pragma unroll
  for (int j = 0; j < kPositionsPerWarp; ++j) {
    const int64_t x = x0 + j < m.X ? x0 + j : m.X - 1;  // (positions past X are not stored)
    row[j] = f + (x / m.X2) * m.sx1 + (x % m.X2) * m.sx2;
    acc[j] = acc_t(0);
  }
  for (int64_t c = lane * VEC; c < m.C; c += 32 * VEC) {
    Pack<scalar_t> raw[kPositionsPerWarp];
#pragma unroll
    for (int j = 0; j < kPositionsPerWarp; ++j) raw[j] = load_stream(row[j] + c);
#pragma unroll
    for (int j = 0; j < kPositionsPerWarp; ++j) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[j] += attention_power_of<P>(static_cast<acc_t>(raw[j].v[v]), p, p_int);
    }
  }
#pragma unroll
  for (int j = 0; j < kPositionsPerWarp; ++j) {
    const acc_t sum = warp_sum(acc[j]);
    if (lane == 0 && x0 + j < m.X) static_cast<acc_t*>(m.out)[b * m.X + x0 + j] = sum / static_cast<acc_t>(m.C);
  }
}

// ---- forward, step 2: per-sample loss and w --------------------------------------------

struct FinishPair {
  void* rs;        // [B, X] opmath: r_s in, w out
  const void* rt;  // [B, X] opmath
  int64_t B, X;
  int64_t loss_begin;  // this pair's first sample in the per-sample losses
  int64_t begin;       // this pair's first block in the launch (a block per sample)
};

using FinishTable = Table<FinishPair>;

// Sum over the block of two values; every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t shared[2][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
  }
  __syncthreads();
  a = acc_t(0);
  b = acc_t(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    a += shared[0][w];
    b += shared[1][w];
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_samples_kernel(const __grid_constant__ FinishTable table, acc_t* sample_loss) {
  const int64_t block = blockIdx.x;
  const FinishPair& q = table.entry[find_entry(table, block)];
  const int64_t b = block - q.begin, X = q.X;
  acc_t* rs = static_cast<acc_t*>(q.rs) + b * X;
  const acc_t* rt = static_cast<const acc_t*>(q.rt) + b * X;
  acc_t ss_s = 0, ss_t = 0;
#pragma unroll 4
  for (int64_t x = threadIdx.x; x < X; x += kThreads) {
    ss_s += rs[x] * rs[x];
    ss_t += rt[x] * rt[x];
  }
  block_sum2(ss_s, ss_t);
  const auto nrm = attention_sample_norms(ss_s, ss_t);
  acc_t sum_d2 = 0, dot = 0;
#pragma unroll 4
  for (int64_t x = threadIdx.x; x < X; x += kThreads) {
    const acc_t a_s = rs[x] * nrm.inv_s, d = a_s - rt[x] * nrm.inv_t;
    sum_d2 += d * d;
    dot += a_s * d;
  }
  block_sum2(sum_d2, dot);
  const acc_t n_elem = static_cast<acc_t>(q.B) * static_cast<acc_t>(X);
  const auto coef = attention_map_coefs(nrm, dot, acc_t(2) / n_elem);
#pragma unroll 4
  for (int64_t x = threadIdx.x; x < X; x += kThreads) {
    const acc_t a_s = rs[x] * nrm.inv_s, d = a_s - rt[x] * nrm.inv_t;
    rs[x] = coef.coef_d * d + coef.coef_a * a_s;
  }
  if (threadIdx.x == 0) sample_loss[q.loss_begin + b] = sum_d2 / n_elem;
}

// ---- backward ------------------------------------------------------------------------

struct GradMap {
  const void* f;
  void* g;
  const void* w;  // [B, X] opmath
  int64_t B, C, X, f_X2, f_sb, f_sc, f_sx1, f_sx2, g_X2, g_sb, g_sc, g_sx1, g_sx2;
  double coef;    // p / C
  int64_t rows;   // rows per block: channels, or positions for the channels layout
  int64_t tiles;  // blocks per sample
  int64_t begin;  // first block of this map in the launch
};

using GradTable = Table<GradMap>;

// Positions layout: a block owns (sample, `rows` channels) and walks their positions
// VEC at a time (VEC == 1: scalar, general strides).
template <typename scalar_t, AttentionPower P, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_grad_positions_kernel(const __grid_constant__ GradTable table, const void* grad_loss,
                                    double pm1_arg, int pm1_int) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block = blockIdx.x;
  const GradMap& m = table.entry[find_entry(table, block)];
  const int64_t local = block - m.begin, b = local / m.tiles, c0 = (local % m.tiles) * m.rows;
  const int rows = static_cast<int>(m.rows < m.C - c0 ? m.rows : m.C - c0);
  const int per_row = static_cast<int>(m.X / VEC), total = rows * per_row;
  const acc_t scale = *static_cast<const acc_t*>(grad_loss) * static_cast<acc_t>(m.coef);
  const acc_t pm1 = static_cast<acc_t>(pm1_arg);
  const scalar_t* f = static_cast<const scalar_t*>(m.f) + b * m.f_sb + c0 * m.f_sc;
  scalar_t* g = static_cast<scalar_t*>(m.g) + b * m.g_sb + c0 * m.g_sc;
  const acc_t* w = static_cast<const acc_t*>(m.w) + b * m.X;
  for (int i0 = threadIdx.x; i0 < total; i0 += kThreads * kUnroll) {
    int row[kUnroll], xi[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      row[u] = i / per_row;
      xi[u] = i - row[u] * per_row;  // vector index in the row
    }
    if constexpr (VEC > 1) {
      Pack<scalar_t> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * kThreads < total) raw[u] = load_stream(f + row[u] * m.f_sc + xi[u] * VEC);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * kThreads >= total) break;
        acc_t wv[VEC];
        load_w<VEC>(w + xi[u] * VEC, wv);
        Pack<scalar_t> out;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t fv = static_cast<acc_t>(raw[u].v[v]);
          out.v[v] = static_cast<scalar_t>(scale * wv[v] * attention_power_grad<P>(fv, pm1, pm1_int));
        }
        store_stream(g + row[u] * m.g_sc + xi[u] * VEC, out);
      }
    } else {
      acc_t raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t x = xi[u];
        if (i0 + u * kThreads < total) {
          raw[u] = static_cast<acc_t>(f[row[u] * m.f_sc + (x / m.f_X2) * m.f_sx1 + (x % m.f_X2) * m.f_sx2]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u * kThreads >= total) break;
        const int64_t x = xi[u];
        g[row[u] * m.g_sc + (x / m.g_X2) * m.g_sx1 + (x % m.g_X2) * m.g_sx2] =
            static_cast<scalar_t>(scale * __ldg(w + x) * attention_power_grad<P>(raw[u], pm1, pm1_int));
      }
    }
  }
}

// Channels layout: a block owns (sample, `rows` positions) and walks their contiguous
// channels VEC at a time; w is one value per position.
template <typename scalar_t, AttentionPower P>
__global__ void __launch_bounds__(kThreads)
    attention_grad_channels_kernel(const __grid_constant__ GradTable table, const void* grad_loss,
                                   double pm1_arg, int pm1_int) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t block = blockIdx.x;
  const GradMap& m = table.entry[find_entry(table, block)];
  const int64_t local = block - m.begin, b = local / m.tiles, x0 = (local % m.tiles) * m.rows;
  const int rows = static_cast<int>(m.rows < m.X - x0 ? m.rows : m.X - x0);
  const int per_row = static_cast<int>(m.C / VEC), total = rows * per_row;
  const acc_t scale = *static_cast<const acc_t*>(grad_loss) * static_cast<acc_t>(m.coef);
  const acc_t pm1 = static_cast<acc_t>(pm1_arg);
  const scalar_t* f = static_cast<const scalar_t*>(m.f) + b * m.f_sb;
  scalar_t* g = static_cast<scalar_t*>(m.g) + b * m.g_sb;
  const acc_t* w = static_cast<const acc_t*>(m.w) + b * m.X + x0;
  for (int i0 = threadIdx.x; i0 < total; i0 += kThreads * kUnroll) {
    Pack<scalar_t> raw[kUnroll];
    int64_t f_off[kUnroll], g_off[kUnroll];
    int row[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      row[u] = i / per_row;
      const int64_t x = x0 + row[u], c = static_cast<int64_t>(i - row[u] * per_row) * VEC;
      f_off[u] = (x / m.f_X2) * m.f_sx1 + (x % m.f_X2) * m.f_sx2 + c;
      g_off[u] = (x / m.g_X2) * m.g_sx1 + (x % m.g_X2) * m.g_sx2 + c;
      if (i < total) raw[u] = load_stream(f + f_off[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * kThreads >= total) break;
      const acc_t k_row = scale * __ldg(w + row[u]);
      Pack<scalar_t> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        out.v[v] = static_cast<scalar_t>(k_row * attention_power_grad<P>(static_cast<acc_t>(raw[u].v[v]), pm1, pm1_int));
      }
      store_stream(g + g_off[u], out);
    }
  }
}

// ---- host side -------------------------------------------------------------------------

// Which kernel reads (and, in backward, writes) a map: 16-byte vectors when the strides,
// sizes and addresses allow, else scalar.
template <typename scalar_t>
Layout pick_layout(const FeatureView& v, const void* p, const FeatureView* vg = nullptr, const void* pg = nullptr) {
  constexpr int64_t VEC = vec_size<scalar_t>();
  const auto positions_ok = [&](const FeatureView& a, const void* ptr) {
    return a.X2 == a.X && a.sx2 == 1 && a.X % VEC == 0 && a.sb % VEC == 0 && a.sc % VEC == 0 && aligned16(ptr);
  };
  const auto channels_ok = [&](const FeatureView& a, const void* ptr) {
    return a.sc == 1 && a.C % VEC == 0 && a.sb % VEC == 0 && a.sx1 % VEC == 0 && a.sx2 % VEC == 0 &&
           aligned16(ptr);
  };
  if (positions_ok(v, p) && (vg == nullptr || positions_ok(*vg, pg))) return Layout::Positions;
  if (channels_ok(v, p) && (vg == nullptr || channels_ok(*vg, pg))) return Layout::Channels;
  return Layout::Scalar;
}

// Launches `launch(table, blocks)` over tables of up to kMaxMaps entries of one layout;
// each entry owns B * tiles consecutive blocks.
template <typename Entry, typename Launch>
void launch_tables(const std::vector<std::pair<Layout, Entry>>& entries, Layout layout, Launch launch) {
  std::vector<Entry> group;
  for (const auto& [l, e] : entries) {
    if (l == layout) group.push_back(e);
  }
  for (size_t first = 0; first < group.size(); first += kMaxMaps) {
    Table<Entry> table{};
    table.n = static_cast<int>(std::min<size_t>(kMaxMaps, group.size() - first));
    int64_t blocks = 0;
    for (int i = 0; i < table.n; ++i) {
      table.entry[i] = group[first + i];
      table.entry[i].begin = blocks;
      blocks += table.entry[i].B * table.entry[i].tiles;
    }
    if (blocks > 0) launch(table, blocks);
  }
}

template <typename scalar_t, AttentionPower P>
void launch_channel_means(const std::vector<std::pair<Layout, MeanMap>>& maps, double p, cudaStream_t stream) {
  const int p_int = integer_power(p);
  constexpr int VEC = vec_size<scalar_t>();
  launch_tables(maps, Layout::Positions, [&](const MeanTable& table, int64_t blocks) {
    channel_mean_positions_kernel<scalar_t, P, VEC><<<blocks, kThreads, 0, stream>>>(table, p, p_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_tables(maps, Layout::Channels, [&](const MeanTable& table, int64_t blocks) {
    channel_mean_channels_kernel<scalar_t, P><<<blocks, kThreads, 0, stream>>>(table, p, p_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_tables(maps, Layout::Scalar, [&](const MeanTable& table, int64_t blocks) {
    channel_mean_positions_kernel<scalar_t, P, 1><<<blocks, kThreads, 0, stream>>>(table, p, p_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> attention_transfer_forward_cuda(at::TensorList f_s,
                                                                                at::TensorList f_t, double p) {
  c10::cuda::CUDAGuard guard(f_s[0].device());
  AttentionForwardProblem prob = prepare_attention_forward(f_s.vec(), f_t.vec(), p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KDFAST_DISPATCH_FLOATING(prob.f_s[0].scalar_type(), "attention_transfer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<std::pair<Layout, MeanMap>> maps;
    for (size_t i = 0; i < prob.f_s.size(); ++i) {
      for (int side = 0; side < 2; ++side) {
        const at::Tensor& f = side == 0 ? prob.f_s[i] : prob.f_t[i];
        const FeatureView& v = side == 0 ? prob.v_s[i] : prob.v_t[i];
        const at::Tensor& out = side == 0 ? prob.maps[i] : prob.teacher_means[i];
        const Layout layout = pick_layout<scalar_t>(v, f.const_data_ptr());
        const int64_t per_block = layout == Layout::Positions  ? 32 * vec_size<scalar_t>()
                                  : layout == Layout::Channels ? kWarps * kPositionsPerWarp
                                                               : 32;
        maps.emplace_back(layout, MeanMap{f.const_data_ptr(), out.mutable_data_ptr(), v.B, v.C, v.X, v.X2, v.sb,
                                          v.sc, v.sx1, v.sx2, (v.X + per_block - 1) / per_block, 0});
      }
    }
    if (attention_power(p) == AttentionPower::Square) {
      launch_channel_means<scalar_t, AttentionPower::Square>(maps, p, stream);
    } else {
      launch_channel_means<scalar_t, AttentionPower::General>(maps, p, stream);
    }
    for (size_t first = 0; first < prob.f_s.size(); first += kMaxMaps) {
      FinishTable table{};
      table.n = static_cast<int>(std::min<size_t>(kMaxMaps, prob.f_s.size() - first));
      int64_t samples = 0;
      for (int j = 0; j < table.n; ++j) {
        const size_t i = first + j;
        table.entry[j] = FinishPair{prob.maps[i].mutable_data_ptr(), prob.teacher_means[i].const_data_ptr(),
                                    prob.v_s[i].B, prob.v_s[i].X, prob.sample_begin[i], samples};
        samples += prob.v_s[i].B;
      }
      finish_samples_kernel<acc_t><<<samples, kThreads, 0, stream>>>(table, prob.sample_loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {at::sum(prob.sample_loss), prob.maps};
}

template <typename scalar_t, AttentionPower P>
void launch_grads(const std::vector<std::pair<Layout, GradMap>>& maps, const void* grad_loss, double p,
                  cudaStream_t stream) {
  const int pm1_int = integer_power(p - 1);
  constexpr int VEC = vec_size<scalar_t>();
  launch_tables(maps, Layout::Positions, [&](const GradTable& table, int64_t blocks) {
    attention_grad_positions_kernel<scalar_t, P, VEC><<<blocks, kThreads, 0, stream>>>(table, grad_loss, p - 1, pm1_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_tables(maps, Layout::Channels, [&](const GradTable& table, int64_t blocks) {
    attention_grad_channels_kernel<scalar_t, P><<<blocks, kThreads, 0, stream>>>(table, grad_loss, p - 1, pm1_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_tables(maps, Layout::Scalar, [&](const GradTable& table, int64_t blocks) {
    attention_grad_positions_kernel<scalar_t, P, 1><<<blocks, kThreads, 0, stream>>>(table, grad_loss, p - 1, pm1_int);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> attention_transfer_backward_cuda(const at::Tensor& grad_loss, at::TensorList f_s,
                                                         at::TensorList maps, double p) {
  c10::cuda::CUDAGuard guard(f_s[0].device());
  AttentionBackwardProblem prob = prepare_attention_backward(f_s.vec(), maps.vec(), p);
  KDFAST_CHECK(grad_loss.numel() == 1 && grad_loss.device() == f_s[0].device(),
               "attention_transfer_backward: grad_loss must hold one value on the maps' device");
  const at::Tensor go = grad_loss.reshape({}).to(prob.maps[0].scalar_type()).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KDFAST_DISPATCH_FLOATING(prob.f_s[0].scalar_type(), "attention_transfer_backward_cuda", [&] {
    std::vector<std::pair<Layout, GradMap>> tasks;
    for (size_t i = 0; i < prob.f_s.size(); ++i) {
      const FeatureView &vf = prob.v_f[i], &vg = prob.v_g[i];
      Layout layout = pick_layout<scalar_t>(vf, prob.f_s[i].const_data_ptr(), &vg, prob.out[i].const_data_ptr());
      if (layout == Layout::Positions && !aligned16(prob.maps[i].const_data_ptr())) layout = Layout::Scalar;
      // ~16K elements a block; rows are channels (positions for the channels layout).
      const int64_t row_len = layout == Layout::Channels ? vf.C : vf.X;
      const int64_t row_count = layout == Layout::Channels ? vf.X : vf.C;
      const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(row_count, 16384 / row_len));
      tasks.emplace_back(layout, GradMap{prob.f_s[i].const_data_ptr(), prob.out[i].mutable_data_ptr(),
                                         prob.maps[i].const_data_ptr(), vf.B, vf.C, vf.X, vf.X2, vf.sb, vf.sc,
                                         vf.sx1, vf.sx2, vg.X2, vg.sb, vg.sc, vg.sx1, vg.sx2,
                                         p / static_cast<double>(vf.C), rows, (row_count + rows - 1) / rows, 0});
    }
    if (attention_power(p) == AttentionPower::Square) {
      launch_grads<scalar_t, AttentionPower::Square>(tasks, go.const_data_ptr(), p, stream);
    } else {
      launch_grads<scalar_t, AttentionPower::General>(tasks, go.const_data_ptr(), p, stream);
    }
  });
  return finish_attention_backward(prob);
}

const char* layout_name(Layout layout) {
  return layout == Layout::Positions ? "positions" : layout == Layout::Channels ? "channels"
                                                                                : "scalar";
}

// The view a kernel reads f through (a contiguous copy's when f has none: copies and fresh
// allocations are 16-byte aligned, hence a null pointer) without copying anything.
std::pair<FeatureView, const void*> kernel_view(const at::Tensor& f) {
  FeatureView v;
  if (feature_view(f, v)) return {v, f.const_data_ptr()};
  feature_view(at::empty(f.sizes(), f.options().device(at::kMeta)), v);
  return {v, nullptr};
}

// The kernel path of a call (kdfast's verified first use): the layouts the forward and the
// backward kernels read, the power's kernel, and "batched" when a layout has more than
// kMaxMaps maps (several launches), e.g. "positions+channels/positions/p2".
std::string attention_path_cuda(at::TensorList f_s, at::TensorList f_t, double p) {
  check_attention_inputs(f_s.vec(), f_t.vec(), p, "attention_path");
  std::map<std::string, int> forward, backward;
  KDFAST_DISPATCH_FLOATING(f_s[0].scalar_type(), "attention_path", [&] {
    for (size_t i = 0; i < f_s.size(); ++i) {
      for (const at::Tensor& f : {f_s[i], f_t[i]}) {
        const auto [v, ptr] = kernel_view(f);
        ++forward[layout_name(pick_layout<scalar_t>(v, ptr))];
      }
      const auto [vf, pf] = kernel_view(f_s[i]);
      const auto [vg, pg] = kernel_view(at::empty_like(f_s[i], f_s[i].options().device(at::kMeta)));
      ++backward[layout_name(pick_layout<scalar_t>(vf, pf, &vg, nullptr))];
    }
  });
  bool batched = false;
  const auto names = [&](const std::map<std::string, int>& layouts) {
    std::string out;
    for (const auto& [name, count] : layouts) {
      out += (out.empty() ? "" : "+") + name;
      batched = batched || count > kMaxMaps;
    }
    return out;
  };
  std::string path = names(forward) + "/" + names(backward);
  path += attention_power(p) == AttentionPower::Square ? "/p2" : "/p";
  return batched || f_s.size() > static_cast<size_t>(kMaxMaps) ? path + "/batched" : path;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast_C, CUDA, m) {
  m.impl("attention_path", &attention_path_cuda);
  m.impl("attention_transfer_forward", &attention_transfer_forward_cuda);
  m.impl("attention_transfer_backward", &attention_transfer_backward_cuda);
}

}  // namespace kdfast
