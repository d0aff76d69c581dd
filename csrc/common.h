// Shared helpers of kdfast's C++ and CUDA sources: argument checks, typed data pointers
// and the [A, V, I] view every softmax-style kernel works on.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#define KDFAST_CHECK(cond, ...) TORCH_CHECK(cond, "kdfast: ", __VA_ARGS__)

// Floating dtypes every kernel accepts; the accumulation type is at::opmath_type<scalar_t>
// (float for half/bfloat16/float, double for double).
#define KDFAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace kdfast {

// How an op allocates the large outputs it writes in full: at::empty_like by default; the
// CPU kernels pass empty_like_reused (csrc/cpu/memory.h).
using EmptyLikeFn = at::Tensor (*)(const at::Tensor&);
inline at::Tensor plain_empty_like(const at::Tensor& like) { return at::empty_like(like); }

// Typed data pointers, read-only and writable.
template <typename T>
const T* cdata(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename T>
T* mdata(const at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// A tensor seen as [A, V, I] around its class dim: rows are the (a, i) pairs and a row's
// V classes lie `stride_v` elements apart. Leading dims merge into A, trailing into I.
struct ClassDimView {
  int64_t A = 1, V = 1, I = 1;
  int64_t stride_a = 0, stride_v = 0, stride_i = 0;
  // Offset of row (a, i) in a contiguous tensor of the rows' shape (x's shape without dim):
  // where per-row outputs and targets live.
  int64_t row_stride_a = 0, row_stride_i = 1;
  bool ok = false;  // false when the leading or trailing dims cannot be merged without a copy
};

inline bool merge_dims(const at::Tensor& x, int64_t begin, int64_t end, int64_t& size,
                       int64_t& stride) {
  size = 1;
  stride = 1;
  bool first = true;
  for (int64_t d = end - 1; d >= begin; --d) {  // innermost first
    if (x.size(d) == 1) continue;
    if (first) {
      stride = x.stride(d);
      first = false;
    } else if (x.stride(d) != stride * size) {
      return false;
    }
    size *= x.size(d);
  }
  return true;
}

inline ClassDimView class_dim_view(const at::Tensor& x, int64_t dim) {
  ClassDimView v;
  v.V = x.size(dim);
  v.stride_v = x.stride(dim);
  v.ok = merge_dims(x, 0, dim, v.A, v.stride_a) && merge_dims(x, dim + 1, x.dim(), v.I, v.stride_i);
  v.row_stride_a = v.I;
  if (v.ok && v.I == 1) {  // lone leading dims act as the inner dim, e.g. a transposed [N, V]
    std::swap(v.A, v.I);
    std::swap(v.stride_a, v.stride_i);
    std::swap(v.row_stride_a, v.row_stride_i);
  }
  return v;
}

}  // namespace kdfast
