// The element types every CPU op's kernels read and write (plain data, no torch headers: the
// kernels' interfaces use it).
#pragma once

namespace fastvit_kernels {
namespace cpu {

// fp32 math and accumulation for all of them; bf16 / fp16 are converted on load and store.
enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace cpu
}  // namespace fastvit_kernels
