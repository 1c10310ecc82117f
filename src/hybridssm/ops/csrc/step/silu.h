// SiLU of the steps' fp32 vectors without a library call, bit for bit ATen's: x / (1 + exp(-x)),
// ATen's formula, with aten_exp.h's exp (Vectorized<float>::exp written out) and the same
// division. K vectors run in lockstep; one vector at a time (any dtype) is common.h's silu, the
// same values.
//
// Tested bit for bit against torch.nn.functional.silu over every float exponent, +-0, denormals,
// +-inf and NaN (tests/ops/test_step_silu_exp.py), on the capability the extension is built for.

#pragma once

#include "aten_exp.h"
#include "common.h"

namespace hybridssm::step {

// silu of K vectors in place, each step applied to all K before the next.
template <int K>
inline void silu_f32_n(Vectorized<float> (&x)[K]) {
  Vectorized<float> e[K];
  for (int i = 0; i < K; ++i) e[i] = x[i].neg();
  aten_exp_f32_n(e);
  for (int i = 0; i < K; ++i) x[i] = x[i] / (Vectorized<float>(1) + e[i]);
}

}  // namespace hybridssm::step
