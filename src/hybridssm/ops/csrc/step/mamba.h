// Mamba-1 mixer step (mixers/mamba.py, MambaStepWeights): one frame, states in place.
//
//   w: in_w [2E, d], conv_w [E, 1, K] or [E, K], conv_b [E] or empty, xproj_w [R + 2N, E],
//      dt_w [E, R], dt_bias [E], A_log [E, N], D [E], out_w [d, E],
//      dt_norm_w [R], b_norm_w [N], c_norm_w [N] (all three or none: the inner norms),
//      in_b [2E], out_b [d] (or empty: proj_bias), f = (eps)
//   states: conv [B, E, K-1], ssm [B, E, N]
//
//   xi, z = in_proj(x) (+ in_b); u = silu(conv([conv ; xi]) + conv_b); dt, Bn, Cn = x_proj(u)
//   with inner norms (Jamba): dt, Bn, Cn = rms(dt) dt_norm_w, rms(Bn) b_norm_w, rms(Cn) c_norm_w
//   delta = softplus(dt_proj(dt) + dt_bias); h = exp(delta * A) h + delta u Bn, A = -exp(A_log)
//   y = out_proj((Cn . h + D u) * silu(z)) (+ out_b)
//
// A is computed from A_log on every call (nothing derived is kept), with the same vectorised exp as
// the forward's torch.exp; the fp32 decay is decay_exp.h's exp (within 1.5 ULP of the exact exp of
// the fp32 product, exp_u20 4.7), fp64 the forward's exp. The dt projection, softplus, state update
// and gated output run in three passes per row (mamba_update.h); the conv + SiLU is conv_silu.h's.

#pragma once

#include "common.h"
#include "conv_silu.h"
#include "mamba_update.h"

namespace hybridssm::step {

// u [B, E] = silu(conv([conv_state ; xi]) + conv_b), xi the first half of each row of xz [B, 2E]; the
// conv windows shift in place. From kConvTapsRows rows the 4-tap conv takes conv_silu.h's vector path.
template <typename scalar_t>
void mamba_conv_rows(const scalar_t* xz, scalar_t* conv_state, const scalar_t* conv_w, const scalar_t* conv_b,
                     scalar_t* u, int64_t Bsz, int64_t E, int64_t K) {
  const bool taps = conv_vector_path<scalar_t>(K) && Bsz >= kConvTapsRows;
  const std::vector<scalar_t> wt = taps ? conv_taps(conv_w, E, K) : std::vector<scalar_t>();
  for (int64_t b = 0; b < Bsz; ++b) {
    conv_silu_step(xz + b * 2 * E, conv_state + b * E * (K - 1), wt.empty() ? nullptr : wt.data(), E, conv_w,
                   u + b * E, E, K, conv_b);
  }
}

// RMSNorm in place of each row's d values at v + r * stride: v * rsqrt(mean(v^2) + eps) * w
template <typename scalar_t>
void rmsnorm_rows_inplace(scalar_t* v, int64_t rows, int64_t stride, int64_t d, const scalar_t* w, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = v + r * stride;
    scalar_t sq = 0;
    for (int64_t i = 0; i < d; ++i) sq += row[i] * row[i];
    const scalar_t s = scalar_t(1) / std::sqrt(sq / scalar_t(d) + static_cast<scalar_t>(eps));
    for (int64_t i = 0; i < d; ++i) row[i] = row[i] * s * w[i];
  }
}

// The mixer's sizes, after checking that its weights and the states of a batch of Bsz rows fit.
struct MambaDims {
  int64_t E, R, N, K;
  bool inner_norms;
};

inline MambaDims mamba_dims(const MixerSpec& m, const at::Tensor* states, int64_t Bsz, at::ScalarType dt) {
  TORCH_CHECK(m.w.size() == 14, "mamba step: expected 14 weights, got ", m.w.size());
  const at::Tensor& conv = states[0];
  const at::Tensor& ssm = states[1];
  const int64_t E = m.w[0].size(0) / 2, R = m.w[4].size(1), N = m.w[6].size(1);
  const int64_t K = m.w[1].size(-1);
  TORCH_CHECK(m.w[0].dim() == 2 && m.w[0].size(0) == 2 * E && m.w[1].numel() == E * K &&
                  m.w[3].dim() == 2 && m.w[3].size(0) == R + 2 * N && m.w[3].size(1) == E &&
                  m.w[4].size(0) == E && m.w[5].numel() == E && m.w[6].size(0) == E && m.w[7].numel() == E &&
                  m.w[8].dim() == 2 && m.w[8].size(1) == E,
              "mamba step: weights do not fit each other");
  TORCH_CHECK(conv.scalar_type() == dt && ssm.scalar_type() == dt, "mamba step: states must be in ", dt);
  TORCH_CHECK(conv.dim() == 3 && conv.size(0) == Bsz && conv.size(1) == E && conv.size(2) == K - 1 &&
                  ssm.dim() == 3 && ssm.size(0) == Bsz && ssm.size(1) == E && ssm.size(2) == N,
              "mamba step: states ", conv.sizes(), ", ", ssm.sizes(), " do not fit the weights (B=", Bsz,
              ", E=", E, ", K=", K, ", N=", N, ")");
  const bool inner_norms = m.w[9].defined() && m.w[9].numel() > 0;
  TORCH_CHECK(!inner_norms || (m.w[9].numel() == R && m.w[10].numel() == N && m.w[11].numel() == N && m.f.size() == 1),
              "mamba step: inner norms need weights [R], [N], [N] and their eps");
  return MambaDims{E, R, N, K, inner_norms};
}

// u [B, E] from the in_proj rows xz [B, 2E] (contiguous), the conv windows in conv [B, E, K-1] shifted
inline at::Tensor mamba_conv(const at::Tensor& xz, const MixerSpec& m, const MambaDims& d, const at::Tensor& conv) {
  const auto dt = xz.scalar_type();
  const int64_t Bsz = xz.size(0);
  const auto conv_w = as_(m.w[1], dt);
  const auto conv_b = opt(m.w[2], dt);
  auto u = at::empty({Bsz, d.E}, xz.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba_conv", [&] {
    mamba_conv_rows<scalar_t>(xz.data_ptr<scalar_t>(), conv.data_ptr<scalar_t>(), conv_w.data_ptr<scalar_t>(),
                              conv_b ? conv_b->data_ptr<scalar_t>() : nullptr, u.data_ptr<scalar_t>(), Bsz, d.E,
                              d.K);
  });
  return u;
}

// the inner norms (Jamba), in place on the x_proj rows dbc [rows, R + 2N] (contiguous); none without them
inline void mamba_inner_norms(const at::Tensor& dbc, const MixerSpec& m, const MambaDims& d) {
  if (!d.inner_norms) return;
  const auto dt = dbc.scalar_type();
  const at::Tensor nw[3] = {as_(m.w[9], dt), as_(m.w[10], dt), as_(m.w[11], dt)};
  const int64_t offset[3] = {0, d.R, d.R + d.N}, width[3] = {d.R, d.N, d.N};
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba_inner_norms", [&] {
    for (int i = 0; i < 3; ++i)
      rmsnorm_rows_inplace<scalar_t>(dbc.data_ptr<scalar_t>() + offset[i], dbc.size(0), d.R + 2 * d.N, width[i],
                                     nw[i].data_ptr<scalar_t>(), m.f[0]);
  });
}

// A [E, N] = -exp(A_log), from the parameter as it is now
inline at::Tensor mamba_decay(const MixerSpec& m, const MambaDims& d, const at::TensorOptions& options) {
  const auto A_log = as_(m.w[6], options.dtype().toScalarType());
  TORCH_CHECK(A_log.numel() == d.E * d.N, "mamba step: weights do not fit each other");
  auto A = at::empty({d.E, d.N}, options);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "mamba_decay", [&] {
    mamba_decay_rates(A_log.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), d.E * d.N);
  });
  return A;
}

// y [B, E] (before out_proj) of one frame's rows: the dt projection, the state update in ssm [B, E, N]
// and the gated output, from xz [B, 2E], u [B, E] and dbc [B, R + 2N] (contiguous rows), A = mamba_decay
inline at::Tensor mamba_update(const at::Tensor& xz, const at::Tensor& u, const at::Tensor& dbc, const at::Tensor& ssm,
                               const at::Tensor& A, const MixerSpec& m, const MambaDims& d) {
  const auto dt = xz.scalar_type();
  const int64_t Bsz = xz.size(0), E = d.E;
  const auto dt_w = as_(m.w[4], dt), dt_bias = as_(m.w[5], dt), Dv = as_(m.w[7], dt);
  TORCH_CHECK(dt_w.dim() == 2 && dt_w.size(1) == d.R && dt_bias.numel() == E,
              "mamba step: weights do not fit each other");
  auto y = at::empty({Bsz, E}, xz.options());
  const auto out_w = as_(m.w[8], dt);
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba_update", [&] {
    const auto dt_wt = Bsz >= kDeltaGemmRows ? transposed(dt_w.data_ptr<scalar_t>(), E, d.R)
                                             : std::vector<scalar_t>();
    const MambaWeights<scalar_t> w{dt_w.data_ptr<scalar_t>(), dt_bias.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                   Dv.data_ptr<scalar_t>(), E, d.R, d.N, out_w.data_ptr(), out_w.nbytes(),
                                   dt_wt.empty() ? nullptr : dt_wt.data()};
    mamba_update_rows<scalar_t>(xz.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dbc.data_ptr<scalar_t>(),
                                ssm.data_ptr<scalar_t>(), w, y.data_ptr<scalar_t>(), Bsz);
  });
  return y;
}

// the projections' weights and biases in the compute dtype (absent bias: an undefined tensor)
inline at::Tensor mamba_in_bias(const MixerSpec& m, at::ScalarType dt) {
  return present(m.w[12]) ? as_(m.w[12], dt) : at::Tensor();
}
inline at::Tensor mamba_out_bias(const MixerSpec& m, at::ScalarType dt) {
  return present(m.w[13]) ? as_(m.w[13], dt) : at::Tensor();
}

inline at::Tensor mamba_mixer_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                                   const at::Tensor& /*pos*/) {
  const auto dt = x.scalar_type();
  const MambaDims d = mamba_dims(m, states, x.size(0), dt);
  const auto xz = linear_small(x, as_(m.w[0], dt), mamba_in_bias(m, dt)).contiguous();  // [B, 2E]
  const auto u = mamba_conv(xz, m, d, states[0]);
  // the x projection: one gemv per row for a small batch, a GEMM for many streams
  const auto dbc = linear_small(u, as_(m.w[3], dt), at::Tensor()).contiguous();  // [B, R + 2N]
  mamba_inner_norms(dbc, m, d);
  const auto y = mamba_update(xz, u, dbc, states[1], mamba_decay(m, d, x.options()), m, d);
  return linear_small(y, as_(m.w[8], dt), mamba_out_bias(m, dt));
}

HYBRIDSSM_MIXER_STEP(mamba, mamba_mixer_step, 2);

}  // namespace hybridssm::step
