// GatedSSM mixer step (mixers/gated_ssm.py, GatedSSMStepWeights): one frame, states in place.
//
//   w: in_w [2E, d], in_b, conv_w [E, E], conv_b, bc_w [2N, E], bc_b, down_w [R, E], down_b,
//      up_w [E, R], up_b, out_w [d, E], out_b        (biases may be empty)
//   f: (alpha)  the context decay
//   states: conv [B, E, K-1] (raw xb), ctx [B, E]
//
//   xb, z = in_proj(x); u = silu(conv_proj(mean([conv ; xb]))); Bt, Ct = bc_proj(u)
//   dt = softplus(dt_up(dt_down(u))); gate = sigmoid(mean dt); bc = sigmoid(Bt . Ct)
//   g = gate bc u; ctx = alpha ctx + (1 - alpha) g; out = out_proj((g + (1 - gate) ctx) * silu(z))

#pragma once

#include "common.h"
#include "scratch.h"

namespace hybridssm::step {

inline at::Tensor gated_ssm_mixer_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                                       const at::Tensor& /*pos*/) {
  TORCH_CHECK(m.w.size() == 12 && m.f.size() == 1, "gated_ssm step: expected 12 weights and 1 float");
  check_compute_dtype("gated_ssm", x);
  const auto dt = x.scalar_type();
  const int64_t Bsz = x.size(0), E = m.w[2].size(0), N = m.w[4].size(0) / 2, R = m.w[6].size(0);
  at::Tensor& conv = states[0];
  at::Tensor& ctx = states[1];
  const int64_t K = conv.size(2) + 1;
  TORCH_CHECK(m.w[0].size(0) == 2 * E && m.w[2].size(1) == E && m.w[4].size(1) == E && m.w[6].size(1) == E &&
                  m.w[8].size(0) == E && m.w[8].size(1) == R && m.w[10].size(1) == E,
              "gated_ssm step: weights do not fit each other");
  TORCH_CHECK(conv.scalar_type() == dt && ctx.scalar_type() == dt, "gated_ssm step: states must be in ", dt);
  TORCH_CHECK(conv.dim() == 3 && conv.size(0) == Bsz && conv.size(1) == E && ctx.dim() == 2 &&
                  ctx.size(0) == Bsz && ctx.size(1) == E,
              "gated_ssm step: states ", conv.sizes(), ", ", ctx.sizes(), " do not fit the weights");
  auto w = [&](int i) { return as_(m.w[i], dt); };
  auto b = [&](int i) { return present(m.w[i]) ? as_(m.w[i], dt) : at::Tensor(); };
  const int64_t d = x.size(1);
  // the output is the one tensor; every intermediate lives in scratch memory (scratch.h)
  auto out = at::empty({Bsz, m.w[10].size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "gated_ssm_step", [&] {
    using Vec = Vectorized<scalar_t>;
    using hybridssm::load;
    using hybridssm::store;
    Scratch scratch;
    scalar_t* xz = scratch.take<scalar_t>(Bsz * 2 * E);   // in_proj: xb, z
    scalar_t* pooled = scratch.take<scalar_t>(Bsz * E);   // the mean pool, then (g + (1 - gate) ctx) silu(z)
    scalar_t* u = scratch.take<scalar_t>(Bsz * E);
    scalar_t* low = scratch.take<scalar_t>(Bsz * R);      // dt_down(u)
    scalar_t* dtv = scratch.take<scalar_t>(Bsz * E);      // dt_up(dt_down(u))
    scalar_t* bcv = scratch.take<scalar_t>(Bsz * 2 * N);  // Bt, Ct
    scalar_t* taps = scratch.take<scalar_t>(E * K);
    linear_into(x.data_ptr<scalar_t>(), d, Bsz, d, w(0), b(1), xz);
    // the forward's mean pool: a depthwise conv whose K taps are all 1/K
    std::fill(taps, taps + E * K, scalar_t(1) / scalar_t(K));
    scalar_t* conv0 = conv.data_ptr<scalar_t>();
    for (int64_t r = 0; r < Bsz; ++r) {
      depthwise_conv_step<scalar_t>(xz + r * 2 * E, conv0 + r * E * (K - 1), taps, nullptr, pooled + r * E, E, K);
    }
    linear_into(pooled, E, Bsz, E, w(2), b(3), u);
    silu_inplace(u, Bsz * E);
    linear_into(u, E, Bsz, E, w(6), b(7), low);
    linear_into(low, R, Bsz, R, w(8), b(9), dtv);
    linear_into(u, E, Bsz, E, w(4), b(5), bcv);
    const Vec alpha(static_cast<scalar_t>(m.f[0])), one_minus(static_cast<scalar_t>(1.0 - m.f[0]));
    scalar_t* ctx0 = ctx.data_ptr<scalar_t>();
    for (int64_t r = 0; r < Bsz; ++r) {
      const scalar_t* ur = u + r * E;
      const scalar_t* dr = dtv + r * E;
      const scalar_t* bc = bcv + r * 2 * N;
      const scalar_t* z = xz + r * 2 * E + E;
      scalar_t* c = ctx0 + r * E;
      scalar_t* yr = pooled + r * E;
      // gate = sigmoid(mean softplus(dt)): only the sum of the softplus is needed, not the values
      Vec dsum(0);
      vec_chunks<scalar_t>(E, [&](int64_t e, int64_t cnt) {
        const Vec dd = load(dr + e, cnt), sp = Vec::blendv(dd.exp().log1p(), dd, dd > Vec(20));
        dsum = dsum + (cnt == Vec::size() ? sp : Vec::set(Vec(0), sp, cnt));
      });
      const scalar_t gate = scalar_t(1) / (scalar_t(1) + std::exp(-(hybridssm::hsum(dsum) / scalar_t(E))));
      const scalar_t bcg = scalar_t(1) / (scalar_t(1) + std::exp(-dot(bc, bc + N, N)));
      const Vec gb(gate * bcg), keep(scalar_t(1) - gate);
      vec_chunks<scalar_t>(E, [&](int64_t e, int64_t cnt) {
        const Vec g = gb * load(ur + e, cnt);
        const Vec cn = alpha * load(c + e, cnt) + one_minus * g;
        store(cn, c + e, cnt);
        store((g + keep * cn) * silu(load(z + e, cnt)), yr + e, cnt);
      });
    }
    linear_into(pooled, E, Bsz, E, w(10), b(11), out.data_ptr<scalar_t>());
  });
  return out;
}

HYBRIDSSM_MIXER_STEP(gated_ssm, gated_ssm_mixer_step, 2);

}  // namespace hybridssm::step
