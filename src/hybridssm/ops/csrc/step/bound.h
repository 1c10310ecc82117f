// A plan bound to one stream's state: SequenceModel.step's in-place fast path as one call that takes
// only the frame (streaming/plan.py's bind).
//
// A stream steps the same state object frame after frame. Python checks that identity (and what only
// Python sees: the plan's generation, the kernel backend, use_fused_step, train mode), then calls
// run(x) here, which holds the state's tensors (handed over once, not converted from a list each
// call), checks the rest of what the slow path would (no gradient mode, no CPU autocast, the frame's
// device, dtype and shape, the model's dtype, each row's room in a full-attention cache) and runs the
// plan. Anything it does not accept returns None with nothing written: the caller then takes the slow
// path, whose checks raise the errors (an attention cache that is full raises there, before any layer
// is written). At batch 1 the weights the step streams evict the Python objects and tables the slow
// path walks, so each of its small calls costs a cache miss or several: measured 60-170 us per step
// outside the plan's run; this path leaves a few attribute reads and this call.

#pragma once

#include "plan.h"

#include <ATen/autocast_mode.h>

#include <optional>
#include <utility>
#include <vector>

namespace hybridssm::step {

class BoundStep {
 public:
  // plan: kept alive by the Python object (keep_alive); states: the state's tensors in the plan's order
  // (contiguous, checked by the caller); pos [B] int64; dtype_ref: the parameter whose dtype is the
  // model's (a write through .data that changes it is seen); width: embed_dim; cap: the full-attention
  // capacity in input positions, or -1 (no full attention).
  BoundStep(const Plan& plan, std::vector<at::Tensor> states, at::Tensor pos, at::Tensor dtype_ref, int64_t width,
            int64_t cap)
      : plan_(&plan),
        states_(std::move(states)),
        pos_(std::move(pos)),
        dtype_ref_(std::move(dtype_ref)),
        dtype_(dtype_ref_.scalar_type()),
        batch_(pos_.size(0)),
        width_(width),
        cap_(cap) {
    TORCH_CHECK(pos_.dim() == 1 && pos_.scalar_type() == at::kLong, "BoundStep: pos must be int64 [B], got ",
                pos_.scalar_type(), " ", pos_.sizes());
  }

  // The step y [B, hidden] (the state's tensors and pos advanced in place), or nullopt, with nothing
  // written, where the slow path must run.
  std::optional<at::Tensor> run(const at::Tensor& x) const {
    if (!accepts(x)) return std::nullopt;
    return plan_->run(x, states_, pos_);
  }

 private:
  bool accepts(const at::Tensor& x) const {
    // the fused step has no autograd; autocast would change the ops' dtypes (the slow path applies it)
    if (at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) return false;
    if (!x.defined() || !x.is_cpu() || x.scalar_type() != dtype_ || dtype_ref_.scalar_type() != dtype_) return false;
    const int64_t dim = x.dim();
    if (!(dim == 2 || (dim == 3 && x.size(1) == 1)) || x.size(0) != batch_ || x.size(dim - 1) != width_) {
      return false;
    }
    // pos is the state's own tensor: still [B] int64 on the CPU (a write through .data could change it)
    if (!pos_.is_cpu() || pos_.dim() != 1 || pos_.size(0) != batch_ || pos_.scalar_type() != at::kLong ||
        !pos_.is_contiguous()) {
      return false;
    }
    if (cap_ >= 0) {  // the step writes position pos[r] of each row's cache: it must exist
      const int64_t* p = pos_.data_ptr<int64_t>();
      for (int64_t r = 0; r < batch_; ++r) {
        if (p[r] >= cap_) return false;
      }
    }
    return true;
  }

  const Plan* plan_;
  std::vector<at::Tensor> states_;
  at::Tensor pos_;
  at::Tensor dtype_ref_;
  at::ScalarType dtype_;
  int64_t batch_;
  int64_t width_;
  int64_t cap_;
};

// The Python class (registered by step.cpp's module).
inline void def_bound_step(pybind11::module& m) {
  pybind11::class_<BoundStep>(m, "BoundStep", "a plan bound to one stream's state (see step/bound.h)")
      .def(pybind11::init<const Plan&, std::vector<at::Tensor>, at::Tensor, at::Tensor, int64_t, int64_t>(),
           pybind11::arg("plan"), pybind11::arg("states"), pybind11::arg("pos"), pybind11::arg("dtype_ref"),
           pybind11::arg("width"), pybind11::arg("cap"), pybind11::keep_alive<1, 2>())
      .def("run", &BoundStep::run, pybind11::arg("x"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace hybridssm::step
