// Fused CPU GRU recurrence (PyTorch's gate order r, z, n), forward and backward.
//
//   gh_t = W_hh h_{t-1} + b_hh                                  [B, 3H]
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z)
//   n = tanh(gi_n + r * gh_n),  h_t = n + z * (h_{t-1} - n)
//
// The input projection gi = W_ih x + b_ih is one GEMM outside (autograd differentiates it); here
// only the sequential part runs: one small GEMM per step (at::addmm_out into a reused buffer) and
// a vectorised element-wise pass. The forward saves (r, z, n, gh_n) per step; the backward walks
// the sequence backwards with one GEMM per step for dh_{t-1} and returns the gate pre-activation
// gradients of every step, so that dW_hh, db_hh and the input projection's gradients are each one
// large GEMM or sum outside.
//
// Layouts (all contiguous): gi [B, T, 3H]; h0 [B, H]; w_hh [3H, H]; b_hh [3H]; y [B, T, H];
// gates [B, T, 4H] = (r, z, n, gh_n). Backward returns dgi [B, T, 3H] (= dgh for the r and z
// gates) and dgh_n [B, T, H] (the n gate's recurrent part, r * da_n), plus dh0 [B, H].

#include <torch/extension.h>

#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "vec_helpers.h"

#include <algorithm>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridssm::load;
using hybridssm::store;

template <typename scalar_t>
inline Vectorized<scalar_t> sigmoid(const Vectorized<scalar_t>& x) {
  using Vec = Vectorized<scalar_t>;
  return Vec(1) / (Vec(1) + x.neg().exp());
}

template <typename scalar_t>
void fwd_gates(const scalar_t* gi, const scalar_t* gh, const scalar_t* h, scalar_t* hn, scalar_t* g,
               int64_t H) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < H; j += W) {
    const int64_t c = std::min(W, H - j);
    const Vec r = sigmoid(load(gi + j, c) + load(gh + j, c));
    const Vec z = sigmoid(load(gi + H + j, c) + load(gh + H + j, c));
    const Vec ghn = load(gh + 2 * H + j, c);
    const Vec n = at::vec::fmadd(r, ghn, load(gi + 2 * H + j, c)).tanh();
    store(at::vec::fmadd(z, load(h + j, c) - n, n), hn + j, c);
    if (g != nullptr) {
      store(r, g + j, c);
      store(z, g + H + j, c);
      store(n, g + 2 * H + j, c);
      store(ghn, g + 3 * H + j, c);
    }
  }
}

// Returns (y [B, T, H], gates [B, T, 4H] or empty).
std::vector<at::Tensor> gru_fwd(const at::Tensor& gi, const at::Tensor& h0, const at::Tensor& w_hh,
                                const at::Tensor& b_hh, bool save) {
  using hybridssm::check_arg;
  hybridssm::check_float("gru_fwd", "gi", gi);
  TORCH_CHECK(gi.dim() == 3 && h0.dim() == 2, "gru_fwd: gi must be [B, T, 3H] and h0 [B, H], got ", gi.sizes(),
              " and ", h0.sizes());
  const int64_t B = gi.size(0), T = gi.size(1), H = h0.size(1);
  const auto d = gi.scalar_type();
  check_arg("gru_fwd", "gi", gi, {B, T, 3 * H}, d);
  check_arg("gru_fwd", "h0", h0, {B, H}, d);
  check_arg("gru_fwd", "w_hh", w_hh, {3 * H, H}, d);
  check_arg("gru_fwd", "b_hh", b_hh, {3 * H}, d);
  auto y = at::empty({B, T, H}, gi.options());
  auto gates = save ? at::empty({B, T, 4 * H}, gi.options()) : at::empty({0}, gi.options());
  auto gh = at::empty({B, 3 * H}, gi.options());
  auto h = h0.clone();
  auto hn = at::empty_like(h0);
  const auto wt = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "gru_fwd", [&] {
    for (int64_t t = 0; t < T; ++t) {
      at::addmm_out(gh, b_hh, h, wt);
      for (int64_t b = 0; b < B; ++b) {
        fwd_gates<scalar_t>(gi.data_ptr<scalar_t>() + (b * T + t) * 3 * H, gh.data_ptr<scalar_t>() + b * 3 * H,
                            h.data_ptr<scalar_t>() + b * H, hn.data_ptr<scalar_t>() + b * H,
                            save ? gates.data_ptr<scalar_t>() + (b * T + t) * 4 * H : nullptr, H);
        std::copy_n(hn.data_ptr<scalar_t>() + b * H, H, y.data_ptr<scalar_t>() + (b * T + t) * H);
      }
      std::swap(h, hn);
    }
  });
  return {y, gates};
}

// Returns (dgi [B, T, 3H], dgh_n [B, T, H], dh0 [B, H]).
// The final state is y[:, -1], so its gradient arrives through dy: the carry starts at zero.
std::vector<at::Tensor> gru_bwd(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& h0,
                                const at::Tensor& w_hh, const at::Tensor& gates) {
  using hybridssm::check_arg;
  hybridssm::check_float("gru_bwd", "y", y);
  TORCH_CHECK(y.dim() == 3, "gru_bwd: y must be [B, T, H], got ", y.sizes());
  const int64_t B = y.size(0), T = y.size(1), H = y.size(2);
  const auto d = y.scalar_type();
  check_arg("gru_bwd", "dy", dy, {B, T, H}, d);
  check_arg("gru_bwd", "y", y, {B, T, H}, d);
  check_arg("gru_bwd", "h0", h0, {B, H}, d);
  check_arg("gru_bwd", "w_hh", w_hh, {3 * H, H}, d);
  hybridssm::check_saved("gru_bwd", "gates", gates, B * T * 4 * H, d);
  auto dgi = at::empty({B, T, 3 * H}, y.options());
  auto dghn = at::empty({B, T, H}, y.options());
  auto dgh = at::empty({B, 3 * H}, y.options());  // this step's recurrent gate gradients
  auto dh = at::zeros_like(h0);                   // dL/dh_t, carried backwards
  auto dprev = at::empty_like(dh);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gru_bwd", [&] {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* g = gates.data_ptr<scalar_t>() + (b * T + t) * 4 * H;
        const scalar_t* hp = t > 0 ? y.data_ptr<scalar_t>() + (b * T + t - 1) * H : h0.data_ptr<scalar_t>() + b * H;
        const scalar_t* dyt = dy.data_ptr<scalar_t>() + (b * T + t) * H;
        scalar_t* dht = dh.data_ptr<scalar_t>() + b * H;
        scalar_t* di = dgi.data_ptr<scalar_t>() + (b * T + t) * 3 * H;
        scalar_t* dr = dgh.data_ptr<scalar_t>() + b * 3 * H;
        scalar_t* dn_rec = dghn.data_ptr<scalar_t>() + (b * T + t) * H;
        scalar_t* dpv = dprev.data_ptr<scalar_t>() + b * H;
        for (int64_t j = 0; j < H; j += W) {
          const int64_t c = std::min(W, H - j);
          const Vec d = load(dht + j, c) + load(dyt + j, c);
          const Vec r = load(g + j, c), z = load(g + H + j, c), n = load(g + 2 * H + j, c);
          const Vec ghn = load(g + 3 * H + j, c), hprev = load(hp + j, c);
          const Vec one(1);
          const Vec dan = d * (one - z) * (one - n * n);
          const Vec dar = dan * ghn * r * (one - r);
          const Vec daz = d * (hprev - n) * z * (one - z);
          store(dar, di + j, c);
          store(daz, di + H + j, c);
          store(dan, di + 2 * H + j, c);
          store(dar, dr + j, c);
          store(daz, dr + H + j, c);
          store(dan * r, dr + 2 * H + j, c);
          store(dan * r, dn_rec + j, c);
          store(d * z, dpv + j, c);
        }
      }
      // dh_{t-1} = dh_t * z + dgh @ W_hh
      at::addmm_out(dh, dprev, dgh, w_hh);
    }
  });
  return {dgi, dghn, dh};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gru_fwd", &gru_fwd, "GRU recurrence forward (CPU)");
  m.def("gru_bwd", &gru_bwd, "GRU recurrence backward (CPU)");
}
