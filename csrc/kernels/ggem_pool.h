// GGeM pooling (group generalized mean over tokens), forward and backward, written once over the
// vocabulary of simd.h. The kernels see only GGeMPool{Fwd,Bwd}Args: raw pointers, element
// strides, sizes.
//
// Math (docs/ggem_pool.md, "Definition" and "Backward"; contract in
// fastvit_kernels/reference/ggem_pool.py), with x̂ = max(x, eps), M
// pooled tokens, l = p·ln x̂, everything in fp32:
//   forward   log_mean = ln((1/M) Σ_n e^l)  as an online log-sum-exp: m = running max of l,
//             s = Σ e^(l - m), rescaled once per block of kRows tokens;  y = exp(log_mean / p)
//   backward  w  = exp((p - 1)·ln x̂ - ln(M·S))  (= x̂^(p-1) / (M·S), finite for every p, x)
//             dx = grad_y · y · w  (0 where x < eps);  T/S = Σ_n w · x̂ · ln x̂
//             dydp = grad_y · y · (T/S - log_mean / p) / p  per (b, c); the caller sums it into dp
// x̂^p itself is never formed, so p = 10 with x near eps (1e-60) or x = 1e4 (1e40) stays finite.
// (simd.h's vexp saturates at e^88.376 = 2.4e38, so y saturates there too: within 30% of FLT_MAX.)
//
// Each task is one batch row b and a block of channels. Tokens are walked in order (rows outer,
// channel vectors inner) so x streams sequentially; the per-channel state (m, s, or the backward's
// constants and T/S) lives in a small scratch array that stays in L1. Every channel is computed by
// the same sequence of operations whatever the block split, so results do not depend on the
// thread count. Vector tails (C not a multiple of the vector width) go through a padded buffer.
//
// Two parts (see isa/kernels.inc): the interface, included normally (include guard; plain data, no
// torch, no intrinsics) and filled by ops/ggem_pool.cpp; and the kernel, compiled only where
// isa/kernels.inc includes this header again inside an ISA namespace and target region
// (FVK_KERNEL_BODIES), after simd.h, kernel_common.h and attention_gemm.h.

// =============================================================================================
// Interface
// =============================================================================================

#ifndef FASTVIT_KERNELS_KERNELS_GGEM_POOL_H
#define FASTVIT_KERNELS_KERNELS_GGEM_POOL_H

#include <cstdint>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// What forward and backward both read. Tokens [prefix, N) of each batch are pooled.
struct GGeMPoolInputs {
  int64_t B, N, C, prefix;
  ElemType dtype;  // of x, y and dx (all the same); everything else the kernels touch is fp32
  float eps;
  float log_count;  // ln(N - prefix)
  // p of each channel's group, fp32 [C] contiguous: the kernels never see the channel layout.
  const float* p;
  // x in [b, n, c] element strides; the channel stride is 1 (the caller copies otherwise).
  const void* x; int64_t x_stride_b, x_stride_n;
  // Work split: task t covers batch b = t / c_tasks and channels
  // [(t % c_tasks) * c_block, min(C, ... + c_block)); c_block is a multiple of kGGeMChannelAlign.
  int64_t c_block, c_tasks;
};

// Channel blocks are whole numbers of vectors for every ISA (16 fp32 lanes at most).
constexpr int64_t kGGeMChannelAlign = 16;

struct GGeMPoolFwdArgs : GGeMPoolInputs {
  void* y;          // [B, C] contiguous, x's dtype
  float* log_mean;  // [B, C] contiguous: ln((1/M) Σ_n max(x, eps)^p)
};

struct GGeMPoolBwdArgs : GGeMPoolInputs {
  const float* grad_y;    // [B, C] contiguous fp32
  const float* log_mean;  // [B, C] contiguous, from the forward
  void* dx;               // [B, N, C] contiguous, x's dtype (prefix rows are written as zeros)
  float* dydp;            // [B, C] contiguous: grad_y · dy/dp_c, summed into dp by the caller
};

}  // namespace cpu
}  // namespace fastvit_kernels

#endif  // FASTVIT_KERNELS_KERNELS_GGEM_POOL_H

// =============================================================================================
// Kernel (one copy per ISA; entry points forward_kernel / backward_kernel)
// =============================================================================================

#ifdef FVK_KERNEL_BODIES
namespace ggem_pool {

static_assert(kGGeMChannelAlign % kW == 0, "channel blocks must hold whole vectors");

// Tokens per online-max rescale (one extra exp per kRows tokens); also the backward's row block.
constexpr int kRows = 8;

// ---------------------------------------------------------------------------------------------
// ln for the clamped inputs
// ---------------------------------------------------------------------------------------------

#if defined(FVK_SIMD_AVX512)
// ln x for finite x >= FLT_MIN without a division (the kernels' hottest operation, one per element
// per direction): x = m · 2^e with m in [0.75, 1.5) (getmant; when it returns m < 1 it halved the
// [1, 2) mantissa, so e is getexp + 1), ln m = 2 atanh(s) with s = (m - 1) / (m + 1) in
// [-1/7, 1/5], summed to s^9 (truncation < 4e-9). 1 / (m + 1) is rcp14 refined by one Newton
// step (~2^-28).
inline vf log_clamped(vf x) {
  const vf m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const vf e0 = _mm512_getexp_ps(x);
  const vf e = _mm512_mask_add_ps(e0, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e0,
                                  _mm512_set1_ps(1.0f));
  const vf d = _mm512_add_ps(m, _mm512_set1_ps(1.0f));
  vf r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  const vf s = _mm512_mul_ps(_mm512_sub_ps(m, _mm512_set1_ps(1.0f)), r);
  const vf s2 = _mm512_mul_ps(s, s);
  vf q = _mm512_set1_ps(1.0f / 9.0f);
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 7.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 5.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 3.0f));
  const vf two_s = _mm512_add_ps(s, s);
  const vf log_m = _mm512_fmadd_ps(_mm512_mul_ps(two_s, s2), q, two_s);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945f), log_m);
}
#else
inline vf log_clamped(vf x) { return vlog(x); }
#endif

// ---------------------------------------------------------------------------------------------
// Element access (Elem<T> from kernel_common.h)
// ---------------------------------------------------------------------------------------------


// kW channels starting at p. With Tail (the last vector of a row, fewer than kW channels valid)
// only `valid` channels are read and the rest of the vector is `pad`; only `valid` are written.
template <typename E, bool Tail = false>
inline vf load_channels(const typename E::type* p, int64_t valid, float pad) {
  if (!Tail) return E::load(p);
  float tmp[kW];
  for (int i = 0; i < kW; ++i) tmp[i] = i < valid ? E::to_f32(p[i]) : pad;
  return vload(tmp);
}

template <typename E, bool Tail = false>
inline void store_channels(typename E::type* p, vf x, int64_t valid) {
  if (!Tail) {
    E::store(p, x);
    return;
  }
  float tmp[kW];
  vstore(tmp, x);
  for (int64_t i = 0; i < valid; ++i) p[i] = E::from_f32(tmp[i]);
}

using F32 = Elem<ElemType::kFloat32>;

// The channels [c0, c1) of task t.
struct TaskRange {
  int64_t b, c0, width;
};

inline TaskRange task_range(const GGeMPoolInputs& a, int64_t t) {
  TaskRange r;
  r.b = t / a.c_tasks;
  r.c0 = (t % a.c_tasks) * a.c_block;
  r.width = std::min(a.C, r.c0 + a.c_block) - r.c0;
  return r;
}

inline int64_t round_up_to_vector(int64_t n) { return (n + kW - 1) / kW * kW; }

// Calls f(tail, j, valid) for the channel vectors [j, j + kW) of a block `width` channels wide:
// full vectors with tail = std::false_type, then at most one partial vector with std::true_type.
template <typename F>
inline void for_each_vector(int64_t width, F&& f) {
  int64_t j = 0;
  for (; j + kW <= width; j += kW) f(std::false_type(), j, int64_t{kW});
  if (j < width) f(std::true_type(), j, width - j);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// R consecutive tokens (row stride sx) of one channel vector into its running (m, s): one log and
// one exp per element plus one rescale per call.
template <typename E, bool Tail, int R>
inline void accumulate_rows(const typename E::type* x, int64_t sx, int64_t valid, vf p, vf eps,
                            float* m_ptr, float* s_ptr) {
  vf l[R];
  const vf m_old = vload(m_ptr);
  vf m_new = m_old;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    l[r] = vmul(p, log_clamped(vmax(eps, load_channels<E, Tail>(x + r * sx, valid, 1.0f))));
    m_new = vmax(l[r], m_new);  // a NaN l is skipped here and poisons s below
  }
  // m_old = -inf on the first block: exp gives 0 (and s is 0).
  vf s = vmul(vload(s_ptr), vexp(vsub(m_old, m_new)));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) s = vadd(s, vexp(vsub(l[r], m_new)));
  vstore(m_ptr, m_new);
  vstore(s_ptr, s);
}

template <ElemType T>
void forward_typed(const GGeMPoolFwdArgs& a, int64_t task_begin, int64_t task_end) {
  using E = Elem<T>;
  using elem_t = typename E::type;
  const int64_t cap = round_up_to_vector(a.c_block);
  const AlignedBuffer scratch(2 * cap);  // running max m and sum s of each channel of the task
  float* m_buf = scratch.data();
  float* s_buf = m_buf + cap;
  const vf eps = vset1(a.eps);
  const vf log_count = vset1(a.log_count);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t t = task_begin; t < task_end; ++t) {
    const TaskRange tr = task_range(a, t);
    const float* pc = a.p + tr.c0;
    for (int64_t j = 0; j < tr.width; j += kW) {
      vstore(m_buf + j, vset1(neg_inf));
      vstore(s_buf + j, vzero());
    }
    const elem_t* xb = static_cast<const elem_t*>(a.x) + tr.b * a.x_stride_b + tr.c0;
    const int64_t sx = a.x_stride_n;
    int64_t n = a.prefix;
    for (; n + kRows <= a.N; n += kRows) {
      const elem_t* row = xb + n * sx;
      for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
        constexpr bool kTail = decltype(tail)::value;
        const vf p = load_channels<F32, kTail>(pc + j, valid, 1.0f);
        accumulate_rows<E, kTail, kRows>(row + j, sx, valid, p, eps, m_buf + j, s_buf + j);
      });
    }
    for (; n < a.N; ++n) {
      const elem_t* row = xb + n * sx;
      for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
        constexpr bool kTail = decltype(tail)::value;
        const vf p = load_channels<F32, kTail>(pc + j, valid, 1.0f);
        accumulate_rows<E, kTail, 1>(row + j, sx, valid, p, eps, m_buf + j, s_buf + j);
      });
    }
    // log_mean = m + ln s - ln M;  y = exp(log_mean / p).
    elem_t* y = static_cast<elem_t*>(a.y) + tr.b * a.C + tr.c0;
    float* log_mean = a.log_mean + tr.b * a.C + tr.c0;
    for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
      constexpr bool kTail = decltype(tail)::value;
      const vf p = load_channels<F32, kTail>(pc + j, valid, 1.0f);
      const vf lm = vsub(vadd(vload(m_buf + j), vlog(vload(s_buf + j))), log_count);
      store_channels<F32, kTail>(log_mean + j, lm, valid);
      store_channels<E, kTail>(y + j, vexp(vdiv(lm, p)), valid);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// R consecutive tokens of one channel vector: writes dx, returns t plus their part of T/S.
template <typename E, bool Tail, int R>
inline vf backward_rows(const typename E::type* x, int64_t sx, typename E::type* dx, int64_t sdx,
                        int64_t valid, vf p_minus_1, vf shift, vf coef, vf eps, vf t) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vf xv = load_channels<E, Tail>(x + r * sx, valid, 1.0f);
    const vf xc = vmax(eps, xv);
    const vf lx = log_clamped(xc);
    const vf w = vexp(vsub(vmul(p_minus_1, lx), shift));
    // The clamp passes the gradient where x >= eps (as torch.clamp); a NaN x gives NaN.
    store_channels<E, Tail>(dx + r * sdx, vsel_lt(xv, eps, vzero(), vmul(coef, w)), valid);
    t = vfma(vmul(w, xc), lx, t);
  }
  return t;
}

template <ElemType T>
void backward_typed(const GGeMPoolBwdArgs& a, int64_t task_begin, int64_t task_end) {
  using E = Elem<T>;
  using elem_t = typename E::type;
  const int64_t cap = round_up_to_vector(a.c_block);
  // Per channel of the task: grad_y · y, ln(M·S), and the running T/S.
  const AlignedBuffer scratch(3 * cap);
  float* coef_buf = scratch.data();
  float* shift_buf = coef_buf + cap;
  float* t_buf = shift_buf + cap;
  const vf eps = vset1(a.eps);
  const vf one = vset1(1.0f);
  const vf log_count = vset1(a.log_count);

  for (int64_t task = task_begin; task < task_end; ++task) {
    const TaskRange tr = task_range(a, task);
    const float* pc = a.p + tr.c0;
    const float* log_mean = a.log_mean + tr.b * a.C + tr.c0;
    const float* grad_y = a.grad_y + tr.b * a.C + tr.c0;
    for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
      constexpr bool kTail = decltype(tail)::value;
      const vf p = load_channels<F32, kTail>(pc + j, valid, 1.0f);
      const vf lm = load_channels<F32, kTail>(log_mean + j, valid, 0.0f);
      const vf y = vexp(vdiv(lm, p));
      vstore(coef_buf + j, vmul(load_channels<F32, kTail>(grad_y + j, valid, 0.0f), y));
      vstore(shift_buf + j, vadd(lm, log_count));
      vstore(t_buf + j, vzero());
    });

    const elem_t* xb = static_cast<const elem_t*>(a.x) + tr.b * a.x_stride_b + tr.c0;
    elem_t* dxb = static_cast<elem_t*>(a.dx) + tr.b * a.N * a.C + tr.c0;
    const int64_t sx = a.x_stride_n, sdx = a.C;
    for (int64_t n = 0; n < a.prefix; ++n) {  // skipped tokens: zero gradient
      for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
        store_channels<E, decltype(tail)::value>(dxb + n * sdx + j, vzero(), valid);
      });
    }
    for (int64_t n = a.prefix; n < a.N; n += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, a.N - n));
      for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
        constexpr bool kTail = decltype(tail)::value;
        const vf pm1 = vsub(load_channels<F32, kTail>(pc + j, valid, 1.0f), one);
        const vf shift = vload(shift_buf + j), coef = vload(coef_buf + j);
        const elem_t* x = xb + n * sx + j;
        elem_t* dx = dxb + n * sdx + j;
        vf t = vload(t_buf + j);
        if (rows == kRows) {
          t = backward_rows<E, kTail, kRows>(x, sx, dx, sdx, valid, pm1, shift, coef, eps, t);
        } else {
          for (int r = 0; r < rows; ++r)
            t = backward_rows<E, kTail, 1>(x + r * sx, sx, dx + r * sdx, sdx, valid, pm1, shift, coef, eps, t);
        }
        vstore(t_buf + j, t);
      });
    }

    // dydp = grad_y · y · (T/S - log_mean / p) / p.
    float* dydp = a.dydp + tr.b * a.C + tr.c0;
    for_each_vector(tr.width, [&](auto tail, int64_t j, int64_t valid) {
      constexpr bool kTail = decltype(tail)::value;
      const vf p = load_channels<F32, kTail>(pc + j, valid, 1.0f);
      const vf lm = load_channels<F32, kTail>(log_mean + j, valid, 0.0f);
      const vf d = vdiv(vmul(vload(coef_buf + j), vsub(vload(t_buf + j), vdiv(lm, p))), p);
      store_channels<F32, kTail>(dydp + j, d, valid);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Element-type dispatch
// ---------------------------------------------------------------------------------------------

inline void forward_kernel(const GGeMPoolFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kBFloat16: forward_typed<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_typed<ElemType::kFloat16>(a, task_begin, task_end); break;
    default: forward_typed<ElemType::kFloat32>(a, task_begin, task_end); break;
  }
}

inline void backward_kernel(const GGeMPoolBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kBFloat16: backward_typed<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_typed<ElemType::kFloat16>(a, task_begin, task_end); break;
    default: backward_typed<ElemType::kFloat32>(a, task_begin, task_end); break;
  }
}

}  // namespace ggem_pool
#endif  // FVK_KERNEL_BODIES
