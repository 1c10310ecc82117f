// The step's work between the mixers (plan.h's blocks) as plain loops over [rows, d] blocks: the
// norms, the residual adds (fused with the norm that reads the sum next), the parallel blocks'
// fusion (sigmoid gate and mix in one pass), the FFN's activation in place in its up projection.
// Called from C++, each ATen op here cost ~1-2 us of dispatch and an allocation (and oneDNN built a
// GELU primitive per call, ~10 us on 1,024 values), on caches the step's weights had just swept.
//
// Values: each loop is the ATen kernel's own arithmetic, so the bits of the op it replaces:
//   LayerNorm   ATen's RowwiseMoments (moments_utils.h), then fma((x - mean) * rstd, w, b), as ATen's
//               CPU layer_norm kernel
//   GELU        ATen's vectorised gelu / tanh-gelu (Gelu.h), the forms of ATen's own GELU kernel
//               with oneDNN off (with oneDNN on, at::gelu of float takes oneDNN's erf: a few ULP off)
//   SiLU        silu.h (ATen's formula with its exp written out); sigmoid 1 / (1 + exp(-x))
//   gate mix    g * s + (1 - g) * a, each product and sum rounded apart (as the separate ATen ops)
// Every element goes through the vector forms, the last partial vector too (ATen runs a tail of
// fewer than 16 values through its scalar formulas: std::erf, std::tanh, std::exp), so each value
// depends on its input alone, never on its place in the row or on the number of rows (the restart
// and prefill paths stack rows and rely on it). RMSNorm keeps the step's loop (x * (1 / sqrt(mean
// (x^2) + eps)) * w: the forward's rsqrt form within a few ULP). tests/ops/test_step_glue.py holds
// each against the ATen op it replaces.
//
// Buffers: the pre-norm's output (the mixers' input) lives in a per-thread scratch tensor reused
// while the shape holds (scratch_rows): two threads stepping one plan, or two plans, never share one.
// The residual stream is updated in place (the plan owns it: never the caller's input).
//
// Measured (batch 1, one thread, this machine shared with other jobs, load 2-3): ATen ops per step
// (torch.profiler) ss_transformer 235 -> 78, hymba 177 -> 54, transformer 101 -> 26, hybrid[griffin_lru] 156
// -> 43, hybrid[rwkv] 136 -> 91, hybrid 108 -> 35, the same at B = 64 (what is left: the mixers' ops and the
// linear layers' allocations). perf shares of the step loop: libtorch 9.7 -> 4.2%, libc 4.3 -> 1.7%
// (ss_transformer), 14.6 -> 6.5% and 5.3 -> 2.1% (transformer), 13.2 -> 5.4% and 5.0 -> 2.4% (hymba), the
// weight read (gemv_rows) 66 -> 73%, 59 -> 69%, 59 -> 69% of the step. bench_step.py
// --against the tree before (4 runs of 3 alternating repeats; the median of the runs' A / B):
// ss_transformer 1.23x, hymba 1.79x, transformer 1.46x, hybrid 1.28x, hybrid[griffin_lru] 1.25x,
// hybrid[rwkv] 1.28x faster (single runs 0.67-3.2x: the machine's rates swing). At B = 64 (3
// alternating pairs) no change beyond the noise. Per fusion: the GELU was the dearest single op
// (at::gelu took oneDNN, which built a primitive per call: ~10 us on 1,024 values; here ~1 us);
// each other replaced op saved its dispatch and allocation (~1-2 us cold), the gate fusion 5 ops and
// 4 allocations, each norm 2 ops and 1 allocation, each residual add 1 and 1. Not done: the residual
// add fused with the next block's norm (one more pass over a row already in L1: nothing to gain at
// d = 256), the FFN's and the gate's products into scratch (they go through linear_small, which
// allocates its output: 2-3 allocations a block).

#pragma once

#include "common.h"
#include "silu.h"

#include <ATen/native/cpu/Gelu.h>
#include <ATen/native/cpu/moments_utils.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstring>

namespace hybridssm::step {

enum NormKind : int64_t { kIdentity = 0, kLayerNorm = 1, kRMSNorm = 2 };
// the FFN's form (layers.FFN): down(gelu(up x)), down(silu(gate x) * up x), down(gelu_tanh(gate x) * up x)
enum FFNKind : int64_t { kGeluFFN = 0, kSwiGLU = 1, kGeGLU = 2 };

// ---- norms of rows ----------------------------------------------------------------------------

// v itself, opaque to the optimiser: a product passed through it is rounded on its own, never fused
// with the add that follows into an FMA (GCC contracts vector mul + add by default in C++), as in
// ATen, where they are two kernels.
template <typename scalar_t>
inline Vectorized<scalar_t> rounded(const Vectorized<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m256 r = v;
    asm("" : "+x"(r));
    return r;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    __m256d r = v;
    asm("" : "+x"(r));
    return r;
  }
#endif
  return v;
}

// y = LayerNorm(x) of one row of d values (y may be x), ATen's CPU kernel's arithmetic:
// mean and variance by ATen's RowwiseMoments, rstd = 1 / sqrt(var + eps), y = fma((x - mean) rstd,
// w, b) (w = 1, b = 0 where absent).
template <typename scalar_t>
inline void layer_norm_row(const scalar_t* x, scalar_t* y, int64_t d, const scalar_t* w, const scalar_t* b,
                           scalar_t eps) {
  using Vec = Vectorized<scalar_t>;
  const auto [mean, var] = at::native::RowwiseMoments(x, d);
  const Vec vm(mean), vr(scalar_t(1) / std::sqrt(var + eps));
  vec_chunks<scalar_t>(d, [&](int64_t i, int64_t cnt) {
    const Vec t = (hybridssm::load(x + i, cnt) - vm) * vr;
    const Vec wv = w != nullptr ? hybridssm::load(w + i, cnt) : Vec(1);
    const Vec bv = b != nullptr ? hybridssm::load(b + i, cnt) : Vec(0);
    hybridssm::store(at::vec::fmadd(t, wv, bv), y + i, cnt);
  });
}

// y = x * (1 / sqrt(mean(x^2) + eps)) * w of one row (y may be x).
template <typename scalar_t>
inline void rms_norm_row(const scalar_t* x, scalar_t* y, int64_t d, const scalar_t* w, scalar_t eps) {
  using Vec = Vectorized<scalar_t>;
  Vec sq(0);
  vec_chunks<scalar_t>(d, [&](int64_t i, int64_t cnt) {
    const Vec a = hybridssm::load(x + i, cnt);
    sq = at::vec::fmadd(a, a, sq);
  });
  const scalar_t s = scalar_t(1) / std::sqrt(hybridssm::hsum(sq) / scalar_t(d) + eps);
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] * s * w[i];
}

// A norm of the plan (LayerNorm with or without weight and bias, RMSNorm, or the identity), holding
// its parameters themselves (read at every call: never a copy).
struct Norm {
  int64_t kind = kIdentity;
  at::Tensor w, b;
  double eps = 0;

  bool identity() const { return kind == kIdentity; }

  // Applies the norm to the rows [rows, d] at x into y (y may be x; the identity copies unless it is).
  // The weights in the compute dtype, contiguous (as_ converts them when they are not).
  template <typename scalar_t>
  void rows(const scalar_t* x, scalar_t* y, int64_t rows, int64_t d) const {
    if (kind == kIdentity) {
      if (x != y) std::memcpy(y, x, rows * d * sizeof(scalar_t));
      return;
    }
    const auto dt = c10::CppTypeToScalarType<scalar_t>::value;
    const at::Tensor wc = present(w) ? as_(w, dt) : at::Tensor();
    const at::Tensor bc = present(b) ? as_(b, dt) : at::Tensor();
    TORCH_CHECK((!wc.defined() || wc.numel() == d) && (!bc.defined() || bc.numel() == d), "step plan: norm ",
                "weight of ", wc.defined() ? wc.numel() : 0, " and bias of ", bc.defined() ? bc.numel() : 0,
                " values for rows of width ", d);
    const scalar_t* wp = wc.defined() ? wc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    const auto e = static_cast<scalar_t>(eps);
    for (int64_t r = 0; r < rows; ++r) {
      if (kind == kLayerNorm) {
        layer_norm_row(x + r * d, y + r * d, d, wp, bp, e);
      } else {
        rms_norm_row(x + r * d, y + r * d, d, wp, e);
      }
    }
  }
};

// ---- per-thread scratch ---------------------------------------------------------------------

// A [rows, d] tensor of this thread's, the same one again while rows, d and the dtype hold (a new
// one, replacing it, otherwise): the pre-norms' outputs, read by the mixers and dead before the next
// norm writes. Created outside inference mode so that it may enter any later call.
inline at::Tensor scratch_rows(int64_t rows, int64_t d, at::ScalarType dt) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.size(0) != rows || buf.size(1) != d || buf.scalar_type() != dt) {
    c10::InferenceMode normal(false);
    buf = at::empty({rows, d}, at::TensorOptions().dtype(dt));
  }
  return buf;
}

// ---- residual adds, fused with the norm that reads the sum ----------------------------------

// h += y over the rows [rows, d] (both contiguous), then out = norm(h) row by row while the row is
// in L1 (out may be h: a post-norm; a null norm: the add alone).
template <typename scalar_t>
void add_norm_rows(scalar_t* h, const scalar_t* y, const Norm* norm, scalar_t* out, int64_t rows, int64_t d) {
  using Vec = Vectorized<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* hr = h + r * d;
    const scalar_t* yr = y + r * d;
    vec_chunks<scalar_t>(d, [&](int64_t i, int64_t cnt) {
      hybridssm::store(hybridssm::load(hr + i, cnt) + hybridssm::load(yr + i, cnt), hr + i, cnt);
    });
    if (norm != nullptr) norm->rows(hr, out + r * d, 1, d);
  }
}

// ---- the parallel blocks' fusion --------------------------------------------------------------

// s = g * s + (1 - g) * a in place, g = sigmoid(gate) (gate: the gate projection's outputs), n values
// each; or (gate null) the mean s = (a + s) * 0.5.
template <typename scalar_t>
void fuse_into(scalar_t* s, const scalar_t* a, const scalar_t* gate, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  vec_chunks<scalar_t>(n, [&](int64_t i, int64_t cnt) {
    const Vec sv = hybridssm::load(s + i, cnt), av = hybridssm::load(a + i, cnt);
    if (gate == nullptr) {
      hybridssm::store((av + sv) * Vec(scalar_t(0.5)), s + i, cnt);
      return;
    }
    const Vec g = sigmoid(hybridssm::load(gate + i, cnt));
    hybridssm::store(rounded(g * sv) + rounded((Vec(1) - g) * av), s + i, cnt);
  });
}

// ---- the FFN's activation ---------------------------------------------------------------------

// up = act(up) (kGeluFFN: the erf GELU) or up = act(gate) * up (kSwiGLU: SiLU; kGeGLU: the tanh GELU),
// n values, in place.
template <typename scalar_t>
void ffn_activation(int64_t kind, scalar_t* up, const scalar_t* gate, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  TORCH_CHECK(kind == kGeluFFN || gate != nullptr, "step plan: the gated FFN kind ", kind, " needs its gate");
  if (kind == kSwiGLU) {
    int64_t i = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; i + 4 * W <= n; i += 4 * W) {  // four vectors in lockstep (silu.h)
        Vec v[4];
        for (int k = 0; k < 4; ++k) v[k] = Vec::loadu(gate + i + k * W);
        silu_f32_n(v);
        for (int k = 0; k < 4; ++k) (v[k] * Vec::loadu(up + i + k * W)).store(up + i + k * W);
      }
    }
    vec_chunks<scalar_t>(n - i, [&](int64_t j, int64_t cnt) {
      hybridssm::store(silu(hybridssm::load(gate + i + j, cnt)) * hybridssm::load(up + i + j, cnt), up + i + j, cnt);
    });
    return;
  }
  vec_chunks<scalar_t>(n, [&](int64_t i, int64_t cnt) {
    if (kind == kGeluFFN) {
      hybridssm::store(at::native::vectorized_gelu(hybridssm::load(up + i, cnt)), up + i, cnt);
    } else {
      const Vec g = at::native::vectorized_gelu_approximated_with_tanh(hybridssm::load(gate + i, cnt));
      hybridssm::store(g * hybridssm::load(up + i, cnt), up + i, cnt);
    }
  });
}

}  // namespace hybridssm::step
