// Torch-facing helpers shared by the CPU ops (<op>.cpp): output poisoning, and the element type
// and stride copies that go into the kernels' plain-data argument structs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include <ATen/core/Tensor.h>

#include "elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// With FASTVIT_KERNELS_POISON=1 (the tests set it) outputs start as NaN, so an element the
// kernel forgets to write cannot pass for a right answer left over in recycled memory.
inline at::Tensor poisoned(at::Tensor t) {
  const char* env = std::getenv("FASTVIT_KERNELS_POISON");
  if (env != nullptr && env[0] == '1' && env[1] == '\0') t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// The kernels' element type of a float32 / bfloat16 / float16 tensor (callers check the dtype).
inline ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return ElemType::kBFloat16;
    case at::kHalf: return ElemType::kFloat16;
    default: return ElemType::kFloat32;
  }
}

template <size_t R>
void copy_strides(const at::Tensor& t, int64_t (&dst)[R]) {
  for (size_t d = 0; d < R; ++d) dst[d] = t.stride(static_cast<int64_t>(d));
}

}  // namespace cpu
}  // namespace fastvit_kernels
