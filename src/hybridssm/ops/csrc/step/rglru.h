// Griffin's recurrent block (mixers/rglru.py), one frame, kind "griffin_lru":
//
//   y = gelu_tanh(W_y x + b_y);   u = conv_K(W_x x + b_x)                        [B, W]
//   i = sigmoid(blockdiag(u; W_i) + b_i);   r = sigmoid(blockdiag(u; W_a) + b_a)
//   log a = -c softplus(Lambda) r;   h = a h + sqrt(1 - a^2) (i u)   (a = 0, factor 1 at pos 0)
//   out = W_out (h * y) + b_out
//
// Weights (RGLRUStepWeights): linear_y.weight [W, d], linear_y.bias [W], linear_x.weight [W, d],
// linear_x.bias [W], conv_weight [W, K], conv_bias [W], input_gate_weight [G, bw, bw],
// input_gate_bias [G, bw], a_gate_weight [G, bw, bw], a_gate_bias [G, bw], a_param [W],
// linear_out.weight [d, W], linear_out.bias [d]; W = G * bw. Floats: (c,) the recurrence power.
// States (RGLRUState): conv [B, W, K-1], h [B, W], pos [B] int64: the mixer's own positions, which the
// first-position rule reads and the step advances (the model-level pos argument is not needed).
#pragma once

#include "common.h"
#include "scratch.h"

namespace hybridssm::step {

// torch's CPU gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
template <typename scalar_t>
inline Vectorized<scalar_t> gelu_tanh(const Vectorized<scalar_t>& x) {
  using Vec = Vectorized<scalar_t>;
  const Vec beta(scalar_t(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa(scalar_t(0.044715));
  const Vec inner = beta * (x + kappa * (x * x * x));
  return Vec(scalar_t(0.5)) * x * (Vec(1) + inner.tanh());
}

// The block-diagonal gate product y [B, G bw] = blockdiag(u [B, G bw]; w [G, bw, bw]) + bias [G bw]:
// y_g = u_g @ w[g] + bias_g per block. A few rows (B <= 4) take each block's rows in order, in
// address order through the whole weight (vecmat over the blocks): the gates are read from memory at
// batch 1, and gemm_nn's column strips (every bw-th line of a block) left them waiting on it. More rows
// share each block in L1 (gemm_nn, 6 rows at a time). Both add the products to the bias in the
// order of the inputs with one FMA each, so a row's values do not depend on B (tests/ops).
// Measured (a C++ harness, 1 thread, load 2.5-2.8, the gates of hybrid[griffin_lru]'s 4 layers,
// [4, 64, 64] x 2 each, cold): gemm_nn at B = 1 took 1.14-1.37x the time of vecmat_blocks, which ran
// at 1.0-1.2x a plain sum of the same bytes; in the step's profile the gates went from 2.9% to 2.3%.
template <typename scalar_t>
void block_diagonal(const scalar_t* u, const scalar_t* w, const scalar_t* bias, scalar_t* y, int64_t B, int64_t G,
                    int64_t bw) {
  const int64_t W = G * bw;
  if (B <= 4) {
    for (int64_t b = 0; b < B; ++b) vecmat_blocks(u + b * W, w, bias, y + b * W, bw, G, bw, bw);
    return;
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * bw;
    gemm_rows_detail::gemm_nn<scalar_t>(u + o, W, w + g * bw * bw, bw, bias + o, y + o, W, B, bw, bw);
  }
}

inline at::Tensor rglru_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states, const at::Tensor&) {
  constexpr const char* kind = "griffin_lru";
  check_compute_dtype(kind, x);
  check_spec(kind, m, 13, 0, 1);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), d = x.size(1);
  TORCH_CHECK(m.w[0].dim() == 2 && m.w[4].dim() == 2 && m.w[6].dim() == 3 && m.w[6].size(0) >= 1,
              "hybridssm step (griffin_lru): linear_y.weight, conv_weight and input_gate_weight must be 2-D, "
              "2-D and 3-D, got ", m.w[0].sizes(), ", ", m.w[4].sizes(), " and ", m.w[6].sizes());
  const int64_t W = m.w[0].size(0), K = m.w[4].size(1), G = m.w[6].size(0), bw = m.w[6].size(1);
  TORCH_CHECK(K >= 1 && G * bw == W, "hybridssm step (griffin_lru): gates of ", G, " blocks of ", bw,
              " do not cover lru_width ", W);
  const auto Wy = weight(kind, m, 0, "linear_y.weight", {W, d}, dt);
  const auto by = weight(kind, m, 1, "linear_y.bias", {W}, dt);
  const auto Wx = weight(kind, m, 2, "linear_x.weight", {W, d}, dt);
  const auto bx = weight(kind, m, 3, "linear_x.bias", {W}, dt);
  const auto cw = weight(kind, m, 4, "conv_weight", {W, K}, dt);
  const auto cb = weight(kind, m, 5, "conv_bias", {W}, dt);
  const auto wi = weight(kind, m, 6, "input_gate_weight", {G, bw, bw}, dt);
  const auto bi = weight(kind, m, 7, "input_gate_bias", {G, bw}, dt);
  const auto wa = weight(kind, m, 8, "a_gate_weight", {G, bw, bw}, dt);
  const auto ba = weight(kind, m, 9, "a_gate_bias", {G, bw}, dt);
  const auto lam = weight(kind, m, 10, "a_param", {W}, dt);
  const auto Wo = weight(kind, m, 11, "linear_out.weight", {d, W}, dt);
  const auto bo = weight(kind, m, 12, "linear_out.bias", {d}, dt);
  check_state(kind, "conv", states[0], {B, W, K - 1}, dt);
  check_state(kind, "h", states[1], {B, W}, dt);
  check_state(kind, "pos", states[2], {B}, at::kLong);

  // the output is the one tensor; every intermediate lives in scratch memory (scratch.h)
  auto out = at::empty({B, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "rglru_step", [&] {
    using Vec = Vectorized<scalar_t>;
    using hybridssm::load;
    using hybridssm::store;
    auto p = [](const at::Tensor& t) { return t.data_ptr<scalar_t>(); };
    Scratch scratch;
    // the gate branch y before its GeLU, the conv input, every row's conv output u and its two gates'
    // pre-activations, h * y (the output projection's input), softplus(Lambda): each [B, W] or [W]
    scalar_t* yb = scratch.take<scalar_t>(B * W);
    scalar_t* xb = scratch.take<scalar_t>(B * W);
    scalar_t* u0 = scratch.take<scalar_t>(B * W);
    scalar_t* gi0 = scratch.take<scalar_t>(B * W);
    scalar_t* ga0 = scratch.take<scalar_t>(B * W);
    scalar_t* hy = scratch.take<scalar_t>(B * W);
    scalar_t* sp = scratch.take<scalar_t>(W);
    linear_into(p(x), d, B, d, Wy, by, yb);
    linear_into(p(x), d, B, d, Wx, bx, xb);
    for (int64_t b = 0; b < B; ++b) {
      depthwise_conv_step(xb + b * W, p(states[0]) + b * W * (K - 1), p(cw), p(cb), u0 + b * W, W, K);
    }
    block_diagonal(u0, p(wi), p(bi), gi0, B, G, bw);
    block_diagonal(u0, p(wa), p(ba), ga0, B, G, bw);
    const Vec neg_c(scalar_t(-m.f[0]));
    std::copy(p(lam), p(lam) + W, sp);
    softplus_inplace(sp, W);  // softplus(Lambda), recomputed each step from the parameter
    int64_t* pos = states[2].data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const bool first = pos[b] == 0;
      const scalar_t *u = u0 + b * W, *gi = gi0 + b * W, *ga = ga0 + b * W, *y = yb + b * W;
      scalar_t* h = p(states[1]) + b * W;
      scalar_t* o = hy + b * W;
      vec_chunks<scalar_t>(W, [&](int64_t c, int64_t cnt) {
        const Vec log_a = neg_c * sigmoid(load(ga + c, cnt)) * load(sp + c, cnt);
        Vec a = log_a.exp();
        Vec mult = (Vec(2) * log_a).expm1().neg().sqrt();  // sqrt(1 - a^2)
        if (first) {  // the first-position rule
          a = Vec(0);
          mult = Vec(1);
        }
        const Vec inp = load(u + c, cnt) * sigmoid(load(gi + c, cnt)) * mult;
        const Vec hn = inp + a * load(h + c, cnt);
        store(hn, h + c, cnt);
        store(hn * gelu_tanh(load(y + c, cnt)), o + c, cnt);
      });
      pos[b] += 1;
    }
    linear_into(hy, W, B, W, Wo, bo, p(out));
  });
  return out;
}

HYBRIDSSM_MIXER_STEP(griffin_lru, rglru_step, 3);

}  // namespace hybridssm::step
