// What the ops' C++ autograd (the last section of every ops/<op>.cpp) shares.
//
// The native ops' autograd lives in C++ so that a call from C++ (eager dispatch, Inductor's C++
// wrapper, an AOTInductor package) never enters Python, even with grad mode on. Each op's
// torch::autograd::Function mirrors the Python backends' autograd of fastvit_kernels/ops/<op>.py
// (what is saved, how a missing output gradient is filled, which gradients are returned); the
// tests compare the two paths' gradients against the same float64 oracle.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastvit_kernels {
namespace cpu {

// The dispatcher handle of "fastvit_kernels::<name>" with C++ signature Sig. Called from inside
// the autograd kernel under at::AutoDispatchBelowADInplaceOrView, it reaches the CPU kernel (or
// the fake implementation when torch.compile traces).
template <class Sig>
c10::TypedOperatorHandle<Sig> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace cpu
}  // namespace fastvit_kernels
