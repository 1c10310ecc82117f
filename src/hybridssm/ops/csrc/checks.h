#pragma once
// Argument checks of the fused kernels' entry points. A kernel reads raw pointers with sizes taken
// from its arguments, so every size, dtype, device and layout it relies on is checked first: a wrong
// call raises (RuntimeError in Python) instead of reading or writing out of bounds.
#include <torch/extension.h>

#include <initializer_list>
#include <string>

namespace hybridssm {

enum class Layout { Contiguous, InnerContiguous };  // InnerContiguous: any strides, unit last stride

inline std::string shape_string(std::initializer_list<int64_t> sizes) {
  std::string s = "[";
  for (auto it = sizes.begin(); it != sizes.end(); ++it) {
    if (it != sizes.begin()) s += ", ";
    s += *it < 0 ? std::string("*") : std::to_string(*it);
  }
  return s + "]";
}

// `t` (argument `name` of `op`) has the shape `sizes` (-1: any), dtype `dtype`, lives on the CPU and
// has the layout the kernel reads it with.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> sizes,
                      at::ScalarType dtype, Layout layout = Layout::Contiguous) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t i = 0;
  for (auto it = sizes.begin(); ok && it != sizes.end(); ++it, ++i) ok = *it < 0 || t.size(i) == *it;
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", shape_string(sizes), ", got ", t.sizes());
  if (layout == Layout::Contiguous) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  } else {
    TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                " needs a contiguous last dim");
  }
}

// The compute dtype: float32 or float64.
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// A tensor that is either empty (not saved) or of `numel` elements, e.g. checkpoints.
inline void check_saved(const char* op, const char* name, const at::Tensor& t, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), op, ": ", name,
              " must be a contiguous CPU tensor of dtype ", dtype);
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, expected ", numel,
              " (from a forward with other inputs, or save=False)");
}

}  // namespace hybridssm
