// The kernels' scratch memory (declared in isa/kernel_table.h): PyTorch's CPU allocator, so that
// the profiler's memory view (and the benchmarks' peak memory, fastvit_kernels/bench/common.py)
// counts it as it counts the ops' output tensors. Compiled without any ISA's target options.
#include <cstddef>
#include <cstdint>

#include <c10/core/CPUAllocator.h>

#include "isa/kernel_table.h"

namespace fastvit_kernels {
namespace cpu {

// Whatever allocator is installed, the block is aligned here: 63 bytes more than asked for.
void* scratch_allocate(size_t bytes, void** owner) {
  auto* block = new c10::DataPtr(c10::GetCPUAllocator()->allocate(bytes + 63));
  *owner = block;
  const auto address = reinterpret_cast<std::uintptr_t>(block->get());
  return reinterpret_cast<void*>((address + 63) & ~std::uintptr_t{63});
}

void scratch_free(void* owner) { delete static_cast<c10::DataPtr*>(owner); }

}  // namespace cpu
}  // namespace fastvit_kernels
