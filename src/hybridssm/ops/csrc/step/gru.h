// The GRU mixer (mixers/gru.py, nn.GRU's equations and gate order r, z, n), one frame, kind "gru":
//
//   [i_r, i_z, i_n] = W_ih x + b_ih;   [h_r, h_z, h_n] = W_hh h + b_hh
//   r = sigmoid(i_r + h_r);  z = sigmoid(i_z + h_z);  n = tanh(i_n + r h_n);  h = n + z (h - n)
//
// Weights (GRUStepWeights): weight_ih [3H, D], weight_hh [3H, H], bias_ih [3H], bias_hh [3H].
// States (GRUState): h [B, H]. Returns the new h (a copy: the state is updated in place too).
#pragma once

#include "common.h"
#include "scratch.h"

namespace hybridssm::step {

inline at::Tensor gru_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states, const at::Tensor&) {
  constexpr const char* kind = "gru";
  check_compute_dtype(kind, x);
  check_spec(kind, m, 4, 0, 0);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(m.w[1].dim() == 2 && m.w[1].size(0) % 3 == 0,
              "hybridssm step (gru): weight_hh must be [3H, H], got ", m.w[1].sizes());
  const int64_t H = m.w[1].size(0) / 3;
  const auto w_ih = weight(kind, m, 0, "weight_ih", {3 * H, D}, dt);
  const auto w_hh = weight(kind, m, 1, "weight_hh", {3 * H, H}, dt);
  const auto b_ih = weight(kind, m, 2, "bias_ih", {3 * H}, dt);
  const auto b_hh = weight(kind, m, 3, "bias_hh", {3 * H}, dt);
  check_state(kind, "h", states[0], {B, H}, dt);

  // the output is the one tensor; the gates' pre-activations live in scratch memory (scratch.h)
  auto y = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "gru_step", [&] {
    using Vec = Vectorized<scalar_t>;
    using hybridssm::load;
    using hybridssm::store;
    Scratch scratch;
    scalar_t* gi = scratch.take<scalar_t>(B * 3 * H);  // W_ih x + b_ih
    scalar_t* gh = scratch.take<scalar_t>(B * 3 * H);  // W_hh h + b_hh
    scalar_t* h0 = states[0].data_ptr<scalar_t>();
    scalar_t* y0 = y.data_ptr<scalar_t>();
    linear_into(x.data_ptr<scalar_t>(), D, B, D, w_ih, b_ih, gi);
    linear_into(h0, H, B, H, w_hh, b_hh, gh);
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t *i = gi + b * 3 * H, *g = gh + b * 3 * H;
      scalar_t* h = h0 + b * H;
      scalar_t* yb = y0 + b * H;
      vec_chunks<scalar_t>(H, [&](int64_t o, int64_t cnt) {
        const Vec r = sigmoid(load(i + o, cnt) + load(g + o, cnt));
        const Vec z = sigmoid(load(i + H + o, cnt) + load(g + H + o, cnt));
        const Vec n = (load(i + 2 * H + o, cnt) + r * load(g + 2 * H + o, cnt)).tanh();
        const Vec hn = n + z * (load(h + o, cnt) - n);
        store(hn, h + o, cnt);
        store(hn, yb + o, cnt);
      });
    }
  });
  return y;
}

HYBRIDSSM_MIXER_STEP(gru, gru_step, 1);

}  // namespace hybridssm::step
