// The fused streaming step: one translation unit that gathers every mixer's step kernel
// (csrc/step/<kind>.h, each registered by kind with HYBRIDSSM_MIXER_STEP) and exposes them to Python.
// The contract every kernel follows is in step/common.h.

#include "step/common.h"

// one include per mixer kind (each file registers its kernels)
#include "step/attention.h"
#include "step/delta_rule.h"
#include "step/gru.h"
#include "step/rglru.h"
#include "step/rwkv.h"

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
  return hybridssm::step::find_mixer(kind)(x.contiguous(), spec, states.data(), pos);
}

std::vector<std::string> mixer_kinds() {
  std::vector<std::string> out;
  for (const auto& kv : hybridssm::step::mixer_registry()) out.push_back(kv.first);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mixer_step", &mixer_step, "one fused mixer step (CPU, no autograd; states in place)");
  m.def("mixer_kinds", &mixer_kinds, "the mixer kinds that have a fused step");
}
