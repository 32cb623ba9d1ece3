// Torch-facing helpers shared by the CPU ops (ops/<op>.cpp): output poisoning, and the element type
// and stride copies that go into the kernels' plain-data argument structs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// With FASTVIT_KERNELS_POISON=1 (the tests set it) outputs start as NaN, so an element the
// kernel forgets to write cannot pass for a right answer left over in recycled memory.
inline bool poison_outputs() {
  const char* env = std::getenv("FASTVIT_KERNELS_POISON");
  return env != nullptr && env[0] == '1' && env[1] == '\0';
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// Integer outputs cannot hold NaN: they are poisoned with -1 (an index no kernel writes).
inline at::Tensor poisoned_index(at::Tensor t) {
  if (poison_outputs()) t.fill_(-1);
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

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A [B, H, N, D] output whose memory is [B, N, H, D] (the layout the models' projection reads,
// so their reshape to [B, N, H * D] is free), poisoned like every output.
inline at::Tensor empty_bhnd(int64_t B, int64_t H, int64_t N, int64_t D, const at::TensorOptions& opt) {
  return poisoned(at::empty({B, N, H, D}, opt)).transpose(1, 2);
}

// Attention forwards split their work into tasks of (b, h, block of query rows). Split the rows
// only as far as needed for about 8 tasks per thread (load balance, and B = 1 still uses every
// core): each split repacks k / v. Rows are independent, so results do not depend on the split.
inline int64_t attention_query_block(int64_t BH, int64_t N) {
  constexpr int64_t kMinQueryBlock = 16;
  constexpr int64_t kTasksPerThread = 8;
  const int64_t want_tasks = kTasksPerThread * std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = std::max<int64_t>(1, (want_tasks + BH - 1) / BH);
  const int64_t block = round_up((N + blocks - 1) / blocks, kMinQueryBlock);
  return std::max(kMinQueryBlock, std::min(block, round_up(N, kMinQueryBlock)));
}

template <size_t R>
void copy_strides(const at::Tensor& t, int64_t (&dst)[R]) {
  for (size_t d = 0; d < R; ++d) dst[d] = t.stride(static_cast<int64_t>(d));
}

}  // namespace cpu
}  // namespace fastvit_kernels
