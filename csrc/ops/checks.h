// Argument checks shared by the ops (ops/<op>.cpp); the checks only one op needs stay in its file.
// Every message starts with the entry point's name `fn` and names the argument, so that an error
// says which call and which input; the texts are part of the behaviour (tests match them).
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastvit_kernels {
namespace cpu {

inline void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

inline void check_defined_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  check_cpu(fn, name, t);
}

// `layout` names the dimensions, e.g. "[B, H, N, D]".
inline void check_dims(const char* fn, const char* name, const at::Tensor& t, int64_t dims,
                       const char* layout) {
  TORCH_CHECK(t.dim() == dims, fn, ": ", name, " must be ", dims, "-D ", layout, ", got shape ",
              t.sizes());
}

inline void check_cpu_nd(const char* fn, const char* name, const at::Tensor& t, int64_t dims,
                         const char* layout) {
  check_defined_cpu(fn, name, t);
  check_dims(fn, name, t, dims, layout);
}

// The attention ops' q, k, v, grad_out, ... of [B, H, N, D].
inline void check_cpu_4d(const char* fn, const char* name, const at::Tensor& t) {
  check_cpu_nd(fn, name, t, 4, "[B, H, N, D]");
}

// The short form for what the op's own forward returned (lse, statistics) and its gradients.
inline void check_defined_on_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
}

// The kernels' element types.
inline void check_float_dtype(const char* fn, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

// `t` has the dtype `want` of the input named `of` (e.g. "q").
inline void check_dtype(const char* fn, const char* name, const at::Tensor& t, at::ScalarType want,
                        const char* of) {
  TORCH_CHECK(t.scalar_type() == want, fn, ": ", name, " must have ", of, "'s dtype ", want,
              ", got ", t.scalar_type());
}

// A parameter (bias table, rpe, p, ...): float32 or the dtype `dt` of the input named `of`.
inline void check_param_dtype(const char* fn, const char* name, const at::Tensor& t,
                              at::ScalarType dt, const char* of) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == dt, fn, ": ", name,
              " must be float32 or ", of, "'s dtype ", dt, ", got ", t.scalar_type());
}

inline void check_float32(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ",
              t.scalar_type());
}

// `layout` names the dimensions of `expected`, e.g. "[B, H, Nq]".
inline void check_shape(const char* fn, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, fn, ": ", name, " must have shape ", layout, " = ", expected,
              ", got ", t.sizes());
}

// One dimension; `what` says where `want` comes from, e.g. "B, from q".
inline void check_size(const char* fn, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t want, const char* what) {
  TORCH_CHECK(t.size(dim) == want, fn, ": ", name, ".shape[", dim, "] must be ", want, " (",
              what, "), got shape ", t.sizes());
}

inline void check_scale(const char* fn, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
}

}  // namespace cpu
}  // namespace fastvit_kernels
