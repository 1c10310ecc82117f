// The fused streaming step: one translation unit that gathers every mixer's step kernel
// (csrc/step/<kind>.h, each registered by kind with HYBRIDSSM_MIXER_STEP) and exposes them to Python.
// The contract every kernel follows is in step/common.h.

#include "step/common.h"

#include <cstring>

// one include per mixer kind (each file registers its kernels)
#include "step/attention.h"
#include "step/delta_rule.h"
#include "step/gated_ssm.h"
#include "step/gru.h"
#include "step/mamba.h"
#include "step/mamba2.h"
#include "step/rglru.h"
#include "step/rwkv.h"

// the model-level step (blocks, norms, fusions, FFNs around the mixers)
#include "step/plan.h"
// the model step bound to one stream's state (SequenceModel.step's fast path)
#include "step/bound.h"

namespace {

using hybridssm::step::MixerSpec;

// One mixer's step, called from Python (tests and the Python-side driver): states are updated in
// place; returns y [B, d_out].
at::Tensor mixer_step(const std::string& kind, const at::Tensor& x, const std::vector<at::Tensor>& w,
                      const std::vector<int64_t>& i, const std::vector<double>& f,
                      std::vector<at::Tensor> states, const at::Tensor& pos) {
  TORCH_CHECK(x.dim() == 2, "mixer_step: x must be [B, d], got ", x.sizes());
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == x.size(0) && pos.scalar_type() == at::kLong,
              "mixer_step: pos must be int64 [", x.size(0), "], got ", pos.sizes());
  for (const auto& s : states) {
    TORCH_CHECK(s.is_contiguous() && s.size(0) == x.size(0),
                "mixer_step: states must be contiguous with batch ", x.size(0), " first, got ", s.sizes());
  }
  const MixerSpec spec{w, i, f};
  const auto fn = hybridssm::step::find_mixer(kind, static_cast<int64_t>(states.size()));
  return fn(x.contiguous(), spec, states.data(), pos);
}

// Rows of a state restart: each dst [B, ...] takes src [1, ...] (the state of one fresh row) in the
// rows where done [B] (bool) is true, in place: one call for every tensor of a state, so a reset
// costs the bytes of the restarted rows. Returns how many rows restarted, or -1, with nothing
// written, where the tensors do not fit this copy (the caller then writes the rows itself): every
// tensor on the CPU and contiguous, each src of its dst's dtype and row shape.
int64_t fill_rows(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, const at::Tensor& done) {
  if (dst.size() != src.size() || done.dim() != 1 || done.scalar_type() != at::kBool || !done.is_contiguous() ||
      !done.is_cpu()) {
    return -1;
  }
  const int64_t B = done.size(0);
  for (size_t k = 0; k < dst.size(); ++k) {
    const auto& d = dst[k];
    const auto& s = src[k];
    const bool fits = d.defined() && s.defined() && d.is_cpu() && s.is_cpu() && d.dim() >= 1 &&
                      d.size(0) == B && d.is_contiguous() && s.dim() == d.dim() && s.size(0) == 1 &&
                      s.sizes().slice(1) == d.sizes().slice(1) && s.scalar_type() == d.scalar_type() &&
                      s.is_contiguous();
    if (!fits) return -1;
  }
  const bool* flag = done.data_ptr<bool>();
  int64_t count = 0;
  for (int64_t r = 0; r < B; ++r) count += flag[r] ? 1 : 0;
  if (count == 0) return 0;
  for (size_t k = 0; k < dst.size(); ++k) hybridssm::step::copy_row_where(dst[k], src[k], flag);
  return count;
}

// The steps' projection x [B, I] @ W [O, I]^T (+ bias) exactly as the kernels compute it
// (common.h's linear_small), for its tests and benchmarks/bench_gemm_rows.py. An empty bias is none;
// streamed: as inside a plan whose weights are read from memory (common.h's weights_streamed).
at::Tensor linear(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias, bool streamed) {
  TORCH_CHECK(x.dim() == 2 && x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "linear: x must be a float or double CPU tensor [B, I], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(W.dim() == 2 && W.size(1) == x.size(1), "linear: W must be [O, I = ", x.size(1), "], got ",
              W.sizes());
  const auto dt = x.scalar_type();
  const hybridssm::step::StreamedWeights scope(streamed);
  return hybridssm::step::linear_small(x, hybridssm::step::as_(W, dt),
                                       hybridssm::step::present(bias) ? hybridssm::step::as_(bias, dt) : bias);
}

// f (a function of K vectors in place) over a float tensor as the step kernels apply it (4 vectors in
// lockstep, the tail one at a time)
template <typename F>
at::Tensor map_f32(const char* name, const at::Tensor& x, const F& f) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": x must be float32, got ", x.scalar_type());
  const auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const float* in = xc.data_ptr<float>();
  float* out = y.data_ptr<float>();
  int64_t i = 0;
  for (; i + 4 * W <= xc.numel(); i += 4 * W) {
    Vec v[4];
    for (int k = 0; k < 4; ++k) v[k] = Vec::loadu(in + i + k * W);
    f(v);
    for (int k = 0; k < 4; ++k) v[k].store(out + i + k * W);
  }
  for (; i < xc.numel(); i += W) {
    const int64_t cnt = std::min<int64_t>(W, xc.numel() - i);
    Vec v[1] = {hybridssm::load(in + i, cnt)};
    f(v);
    hybridssm::store(v[0], out + i, cnt);
  }
  return y;
}

// The Mamba step's fp32 softplus of delta (step/softplus.h) over a float tensor, for the tests of its
// error bound against torch's.
at::Tensor softplus_f32(const at::Tensor& x) {
  return map_f32("softplus_f32", x, [](auto& v) {
    for (auto& e : v) e = hybridssm::step::softplus_f32(e);
  });
}

// The steps' fp32 SiLU (step/silu.h) and exp (step/aten_exp.h), for the tests that hold them to
// torch's bit for bit.
at::Tensor silu_f32(const at::Tensor& x) {
  return map_f32("silu_f32", x, [](auto& v) { hybridssm::step::silu_f32_n(v); });
}
at::Tensor exp_f32(const at::Tensor& x, bool library) {
  if (library) {  // the reference: Vectorized<float>::exp itself
    return map_f32("exp_f32", x, [](auto& v) {
      for (auto& e : v) e = e.exp();
    });
  }
  return map_f32("exp_f32", x, [](auto& v) { hybridssm::step::aten_exp_f32_n(v); });
}

// The Mamba step's fp32 decay exp(delta A) as its update computes it (step/decay_exp.h's exp of the
// fp32 product), elementwise over float tensors of one shape, for the tests of its error bound.
at::Tensor mamba_decay_f32(const at::Tensor& delta, const at::Tensor& A) {
  TORCH_CHECK(delta.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat,
              "mamba_decay_f32: delta and A must be float32, got ", delta.scalar_type(), " and ", A.scalar_type());
  TORCH_CHECK(delta.sizes() == A.sizes(), "mamba_decay_f32: delta ", delta.sizes(), " and A ", A.sizes(),
              " must have one shape");
  const auto dc = delta.contiguous(), ac = A.contiguous();
  auto y = at::empty_like(dc);
  using Vec = at::vec::Vectorized<float>;
  const float* d = dc.data_ptr<float>();
  const float* a = ac.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t i = 0; i < dc.numel(); i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), dc.numel() - i);
    const Vec x = hybridssm::load(d + i, cnt) * hybridssm::load(a + i, cnt);
    hybridssm::store(hybridssm::step::scan_decay_exp(x), out + i, cnt);
  }
  return y;
}

// plan.h's glue (step/glue.h) over float or double CPU tensors, for the tests that hold each loop to
// the ATen ops it replaces. glue_norm: Norm kind (0 identity, 1 LayerNorm, 2 RMSNorm; an empty weight or
// bias is none) of x [rows, d] into a new tensor.
at::Tensor glue_norm(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& b, double eps) {
  TORCH_CHECK(x.dim() == 2, "glue_norm: x must be [rows, d], got ", x.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 2, "glue_norm: kind must be 0 (identity), 1 (LayerNorm) or 2 (RMSNorm), got ", kind);
  TORCH_CHECK(kind != 2 || hybridssm::step::present(w), "glue_norm: an RMSNorm needs its weight");
  const hybridssm::step::Norm norm{kind, w, b, eps};
  const auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "glue_norm", [&] {
    norm.rows(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), xc.size(0), xc.size(1));
  });
  return out;
}

// h + y and the norm of the sum (add_norm_rows: a null norm when kind is 0): returns (h + y, norm(h + y)).
std::tuple<at::Tensor, at::Tensor> glue_add_norm(const at::Tensor& h, const at::Tensor& y, int64_t kind,
                                                 const at::Tensor& w, const at::Tensor& b, double eps) {
  TORCH_CHECK(h.dim() == 2 && y.sizes() == h.sizes() && y.scalar_type() == h.scalar_type(),
              "glue_add_norm: h and y must be [rows, d] of one dtype, got ", h.sizes(), " and ", y.sizes());
  auto sum = h.clone(at::MemoryFormat::Contiguous);
  const auto yc = y.contiguous();
  auto out = at::zeros_like(sum);
  const hybridssm::step::Norm norm{kind, w, b, eps};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "glue_add_norm", [&] {
    hybridssm::step::add_norm_rows(sum.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), kind == 0 ? nullptr : &norm,
                                   out.data_ptr<scalar_t>(), sum.size(0), sum.size(1));
  });
  return {sum, out};
}

// The parallel blocks' fusion (fuse_into): sigmoid(gate) * s + (1 - sigmoid(gate)) * a, or (gate empty)
// (a + s) * 0.5, into a new tensor.
at::Tensor glue_fuse(const at::Tensor& s, const at::Tensor& a, const at::Tensor& gate) {
  const bool gated = hybridssm::step::present(gate);
  TORCH_CHECK(a.sizes() == s.sizes() && (!gated || gate.sizes() == s.sizes()) && a.scalar_type() == s.scalar_type() &&
                  (!gated || gate.scalar_type() == s.scalar_type()),
              "glue_fuse: s, a (and gate) must have one shape and dtype, got ", s.sizes(), ", ", a.sizes());
  auto out = s.clone(at::MemoryFormat::Contiguous);
  const auto ac = a.contiguous();
  const auto gc = gated ? gate.contiguous() : gate;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "glue_fuse", [&] {
    hybridssm::step::fuse_into(out.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
                               gated ? gc.data_ptr<scalar_t>() : nullptr, out.numel());
  });
  return out;
}

// The FFN's activation (ffn_activation): kind 0 gelu(up), 1 silu(gate) * up, 2 gelu_tanh(gate) * up, new.
at::Tensor glue_ffn_activation(int64_t kind, const at::Tensor& up, const at::Tensor& gate) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "glue_ffn_activation: kind must be 0 (gelu), 1 (swiglu) or 2 (geglu), got ", kind);
  TORCH_CHECK(kind == 0 || (gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type()),
              "glue_ffn_activation: the gate must have up's shape and dtype ", up.sizes());
  auto out = up.clone(at::MemoryFormat::Contiguous);
  const auto gc = kind == 0 ? gate : gate.contiguous();
  AT_DISPATCH_FLOATING_TYPES(up.scalar_type(), "glue_ffn_activation", [&] {
    hybridssm::step::ffn_activation(kind, out.data_ptr<scalar_t>(), kind == 0 ? nullptr : gc.data_ptr<scalar_t>(),
                                    out.numel());
  });
  return out;
}

// Griffin's block-diagonal gate product (step/rglru.h's block_diagonal) of u [B, G bw] with
// w [G, bw, bw] and bias [G, bw], by the route the step takes at this B, for the tests that hold the
// batch-1 route to the many-row one bit for bit.
at::Tensor block_diagonal(const at::Tensor& u, const at::Tensor& w, const at::Tensor& bias) {
  TORCH_CHECK(w.dim() == 3 && w.size(1) == w.size(2) && u.dim() == 2 && u.size(1) == w.size(0) * w.size(1) &&
                  bias.numel() == u.size(1),
              "block_diagonal: u [B, G bw], w [G, bw, bw] and bias [G, bw] do not fit: ", u.sizes(), ", ", w.sizes(),
              ", ", bias.sizes());
  const auto dt = u.scalar_type();
  const auto uc = u.contiguous(), wc = hybridssm::step::as_(w, dt), bc = hybridssm::step::as_(bias, dt);
  auto y = at::empty_like(uc);
  AT_DISPATCH_FLOATING_TYPES(dt, "block_diagonal", [&] {
    hybridssm::step::block_diagonal<scalar_t>(uc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                                              y.data_ptr<scalar_t>(), uc.size(0), w.size(0), w.size(1));
  });
  return y;
}

// The step kernels' scratch memory (step/scratch.h): one frame takes a buffer of each size (bytes),
// fills buffer k with the byte k % 251 + 1, then checks every buffer still holds its bytes (none
// overlaps another, none moved when the arena grew); an inner frame takes `inner` bytes on top and
// ends before the check. Returns the buffers' addresses, then the address of a buffer taken after the
// inner frame ended (its memory handed back: the same address as the inner one's), then the inner one's.
std::vector<int64_t> scratch_takes(const std::vector<int64_t>& sizes, int64_t inner) {
  using hybridssm::step::Scratch;
  Scratch frame;
  std::vector<int64_t> out;
  std::vector<unsigned char*> bufs;
  for (size_t k = 0; k < sizes.size(); ++k) {
    auto* p = frame.take<unsigned char>(sizes[k]);
    std::memset(p, static_cast<int>(k % 251 + 1), static_cast<size_t>(sizes[k]));
    bufs.push_back(p);
    out.push_back(reinterpret_cast<int64_t>(p));
  }
  int64_t inner_addr = 0;
  {
    Scratch nested;
    auto* p = nested.take<unsigned char>(inner);
    std::memset(p, 0, static_cast<size_t>(inner));
    inner_addr = reinterpret_cast<int64_t>(p);
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    for (int64_t i = 0; i < sizes[k]; ++i) {
      TORCH_CHECK(bufs[k][i] == k % 251 + 1, "scratch_takes: buffer ", k, " was overwritten at byte ", i);
    }
  }
  out.push_back(reinterpret_cast<int64_t>(frame.take<unsigned char>(inner)));
  out.push_back(inner_addr);
  return out;
}

std::vector<std::string> mixer_kinds() {
  std::vector<std::string> out;
  for (const auto& kv : hybridssm::step::mixer_registry()) out.push_back(kv.first);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mixer_step", &mixer_step, "one fused mixer step (CPU, no autograd; states in place)");
  m.def("fill_rows", &fill_rows, "restart the rows where done is true from one fresh row (in place)",
        pybind11::arg("dst"), pybind11::arg("src"), pybind11::arg("done"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("linear", &linear, "the steps' projection x @ W^T (+ bias), as the kernels compute it",
        pybind11::arg("x"), pybind11::arg("W"), pybind11::arg("bias"), pybind11::arg("streamed") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_diagonal", &block_diagonal, "Griffin's block-diagonal gate product as the step computes it (tests)",
        pybind11::arg("u"), pybind11::arg("w"), pybind11::arg("bias"));
  m.def("scratch_takes", &scratch_takes, "the step kernels' scratch memory: buffers of the given sizes (tests)",
        pybind11::arg("sizes"), pybind11::arg("inner"));
  m.def("mixer_kinds", &mixer_kinds, "the mixer kinds that have a fused step");
  m.def("softplus_f32", &softplus_f32, "the Mamba step's fp32 softplus (tests of its error bound)");
  m.def("silu_f32", &silu_f32, "the steps' fp32 SiLU (tests: bit for bit torch's)");
  m.def("exp_f32", &exp_f32, "the steps' fp32 exp, or (library) ATen's vectorised exp it reproduces bit for bit",
        pybind11::arg("x"), pybind11::arg("library") = false);
  m.def("mamba_decay_f32", &mamba_decay_f32, "the Mamba step's fp32 decay exp(delta A) (tests of its error bound)",
        pybind11::arg("delta"), pybind11::arg("A"));
  m.def("glue_norm", &glue_norm, "plan.h's norm of x [rows, d] (tests of glue.h)", pybind11::arg("x"),
        pybind11::arg("kind"), pybind11::arg("w"), pybind11::arg("b"), pybind11::arg("eps"));
  m.def("glue_add_norm", &glue_add_norm, "the residual add and the norm of the sum (tests of glue.h)",
        pybind11::arg("h"), pybind11::arg("y"), pybind11::arg("kind"), pybind11::arg("w"), pybind11::arg("b"),
        pybind11::arg("eps"));
  m.def("glue_fuse", &glue_fuse, "the parallel blocks' gate or mean fusion (tests of glue.h)", pybind11::arg("s"),
        pybind11::arg("a"), pybind11::arg("gate"));
  m.def("glue_ffn_activation", &glue_ffn_activation, "the FFN's activation in place (tests of glue.h)",
        pybind11::arg("kind"), pybind11::arg("up"), pybind11::arg("gate"));
  using hybridssm::step::Plan;
  pybind11::class_<Plan>(m, "Plan", "a model's whole step in one call (see step/plan.h)")
      .def(pybind11::init<>())
      .def("set_input", &Plan::set_input, pybind11::arg("w"), pybind11::arg("b"))
      .def("set_final_norm", &Plan::set_final_norm, pybind11::arg("kind"), pybind11::arg("w"),
           pybind11::arg("b"), pybind11::arg("eps"))
      .def("add_block", &Plan::add_block, pybind11::arg("pre_norm"), pybind11::arg("norm_kind"),
           pybind11::arg("norm_w"), pybind11::arg("norm_b"), pybind11::arg("norm_eps"), pybind11::arg("kinds"),
           pybind11::arg("weights"), pybind11::arg("ints"), pybind11::arg("floats"), pybind11::arg("n_states"),
           pybind11::arg("fusion"), pybind11::arg("fusion_w"), pybind11::arg("fusion_eps"),
           pybind11::arg("ffn_norm_kind"), pybind11::arg("ffn"), pybind11::arg("ffn_eps"),
           pybind11::arg("ffn_kind"))
      .def("num_states", &Plan::num_states)
      .def("restarts", &Plan::restarts)
      .def("run", &Plan::run, pybind11::arg("x"), pybind11::arg("states"), pybind11::arg("pos"),
           pybind11::arg("tokens") = pybind11::none(), pybind11::arg("done") = pybind11::none(), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("prefill", &Plan::prefill, pybind11::arg("h"), pybind11::arg("states"), pybind11::arg("pos"),
           pybind11::arg("by_frame") = false, pybind11::call_guard<pybind11::gil_scoped_release>());
  hybridssm::step::def_bound_step(m);
}
