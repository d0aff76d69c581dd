// Reverse KL, JSD and TVD on the CPU (csrc/cpu/softmax_divergence.cpp): the dense part of
// kdfast_C.softmax_kl for divergences other than forward KL.
#pragma once
#include "../softmax_kl.h"

namespace kdfast {

// Row losses into p.row_loss and, when p.compute_grad, the gradient into p.grad; scale:
// d(reduced loss)/d(row loss).
void softmax_divergence_cpu(const SoftmaxKLProblem& p, double scale);

}  // namespace kdfast
