// Host-side checks of the relational kernels, shared by the CPU and CUDA implementations
// (math: relational_math.h). Every kernel takes the student's and the teacher's Gram
// matrices [B, B] in the accumulation dtype (float32 or float64) and returns the loss
// (0-dim) and, when asked, S = dL/dG_s + (dL/dG_s)^T.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common.h"
#include "relational_math.h"

namespace kdfast {

inline void check_grams(const at::Tensor& g_s, const at::Tensor& g_t, const char* op) {
  KDFAST_CHECK(g_s.dim() == 2 && g_s.size(0) == g_s.size(1), op,
               ": the student Gram matrix must be square [B, B], got ", g_s.sizes());
  KDFAST_CHECK(g_t.sizes() == g_s.sizes(), op, ": student Gram ", g_s.sizes(),
               " and teacher Gram ", g_t.sizes(), " differ in shape");
  KDFAST_CHECK(g_s.size(0) >= 2, op, ": needs a batch of at least 2, got ", g_s.size(0));
  KDFAST_CHECK(g_s.scalar_type() == g_t.scalar_type(), op, ": student and teacher Gram dtypes differ");
  KDFAST_CHECK(g_s.scalar_type() == at::kFloat || g_s.scalar_type() == at::kDouble, op,
               ": Gram matrices are float32 or float64, got ", g_s.scalar_type());
  KDFAST_CHECK(g_s.device() == g_t.device(), op, ": student and teacher Grams on different devices");
}

// A checked call of a relational kernel: the Grams made contiguous, and S ([B, B], or
// empty without compute_grad) for the kernel to fill.
struct GramProblem {
  at::Tensor gs, gt, S;
  int64_t B;
};

inline GramProblem prepare_grams(const at::Tensor& g_s, const at::Tensor& g_t, bool compute_grad, const char* op) {
  check_grams(g_s, g_t, op);
  GramProblem g{g_s.contiguous(), g_t.contiguous(), at::Tensor(), g_s.size(0)};
  g.S = compute_grad ? at::empty({g.B, g.B}, g.gs.options()) : at::empty({0}, g.gs.options());
  return g;
}

}  // namespace kdfast
