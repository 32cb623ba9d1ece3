// The one place where an op picks the kernels of the CPU ISA chosen at run time (isa/isa.h:
// set_cpu_isa(), FASTVIT_KERNELS_CPU_ISA, or the best this CPU runs) and runs them over its tasks.
#pragma once

#include <cstdint>

#include <ATen/Parallel.h>

#include "isa/isa.h"
#include "isa/isa_config.h"
#include "isa/kernel_table.h"

namespace fastvit_kernels {
namespace cpu {

// Read at every call: the ISA may change between calls (tests force each one in turn).
inline const KernelTable& current_kernels() {
  switch (current_cpu_isa()) {
#if FVK_BF16_KERNELS
    case CpuIsa::kAmx: return amx::kKernels;
    case CpuIsa::kAvx512Bf16: return avx512bf16::kKernels;
#endif
#if FVK_X86_KERNELS
    case CpuIsa::kAvx512: return avx512::kKernels;
    case CpuIsa::kAvx2: return avx2::kKernels;
#endif
    default: return scalar::kKernels;
  }
}

// Runs the current ISA's `entry` (e.g. &KernelTable::bias_attention_forward) over tasks
// [0, tasks), with at::parallel_for handing out contiguous ranges of at least one task.
template <class Args>
void run_tasks(KernelFn<Args> KernelTable::*entry, const Args& args, int64_t tasks) {
  const KernelFn<Args> kernel = current_kernels().*entry;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

}  // namespace cpu
}  // namespace fastvit_kernels
