// Packed variable-length softmax attention (DynamicViT after token dropping), forward and
// backward, written once over the vocabulary of simd.h. The kernels see only
// VarlenAttention{Fwd,Bwd}Args: raw pointers, element strides, sizes.
//
// Math (fastvit_kernels/reference/varlen_attention.py), fp32 accumulation for every element type;
// for rows i, j of one segment [start, start + n) and one head:
//   S = q k^T * scale,  P = softmax_j(S),  O = P v,  lse = log sum_j exp(S)
// Backward: delta_i = dO_i . O_i, dP = dO v^T, dS = P * (dP - delta),
//   dq = dS k * scale, dk = dS^T q * scale, dv = P^T dO.
//
// Every product goes through product<T>() of attention_gemm.h, on operands packed into fp32
// scratch (plus their bf16 twins where bf16 inputs multiply in bf16: the amx level); k / v are repacked only when a thread moves to another (segment,
// head). Key columns past the segment's end (vector padding) are masked with -inf before the
// softmax. Each query row's result depends only on its own data, never on how rows are grouped
// into tasks, so any thread count gives the same bits.
//
// Two parts (see isa/kernels.inc): the interface, included normally (include guard; plain data, no
// torch, no intrinsics) and filled by ops/varlen_attention.cpp; and the kernel, compiled only where
// isa/kernels.inc includes this header again inside an ISA namespace and target region
// (FVK_KERNEL_BODIES), after simd.h, kernel_common.h and attention_gemm.h.

// =============================================================================================
// Interface
// =============================================================================================

#ifndef FASTVIT_KERNELS_KERNELS_VARLEN_ATTENTION_H
#define FASTVIT_KERNELS_KERNELS_VARLEN_ATTENTION_H

#include <cstdint>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// Largest head width D the kernels take (their scratch holds a few rows of D floats per query
// row; wider heads are no ViT's and would only grow it).
constexpr int64_t kVarlenMaxHeadDim = 256;

// One unit of work: query rows [q_begin, q_end) (indices inside the segment) of segment `seg`,
// head `head`. Built by ops/varlen_attention.cpp; tasks of one (seg, head) are consecutive, so a
// thread repacks k / v only when its (seg, head) changes.
struct VarlenTask {
  int64_t seg, head, q_begin, q_end;
};

// What forward and backward both read: sizes, scale, segments and q / k / v.
struct VarlenAttentionInputs {
  int64_t T, H, D;
  int64_t num_seqs, max_seqlen;  // max_seqlen: the longest segment (sizes the scratch)
  ElemType dtype;                // of q, k, v, grad_out, out and dq / dk / dv (all the same)
  float scale;
  const int64_t* cu_seqlens;     // [num_seqs + 1], 0 = cu[0] < cu[1] < ... < cu[num_seqs] = T
  // Element strides in [t, h, d] order (any values).
  const void* q; int64_t q_stride[3];
  const void* k; int64_t k_stride[3];
  const void* v; int64_t v_stride[3];
  const VarlenTask* tasks;       // the work list, run by index
};

struct VarlenAttentionFwdArgs : VarlenAttentionInputs {
  // Outputs, contiguous: out [T, H, D] in dtype, lse [T, H] fp32.
  void* out;
  float* lse;
};

struct VarlenAttentionBwdArgs : VarlenAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[3];
  const void* out; int64_t out_stride[3];
  const float* lse; int64_t lse_stride[2];
  // Outputs, contiguous [T, H, D]. Every task covers all query rows of its (seg, head), so
  // dk / dv rows have exactly one owner (no atomics, no partial sums).
  void* dq;
  void* dk;
  void* dv;
  int64_t q_block;  // query rows per inner block (P / dS of a block stay in L1 / L2)
};

}  // namespace cpu
}  // namespace fastvit_kernels

#endif  // FASTVIT_KERNELS_KERNELS_VARLEN_ATTENTION_H

// =============================================================================================
// Kernel (one copy per ISA; entry points forward_kernel / backward_kernel)
// =============================================================================================

#ifdef FVK_KERNEL_BODIES
namespace varlen_attention {

// ---------------------------------------------------------------------------------------------
// Operand layout: x[t, h, :] of packed [T, H, D] tensors, through the shared packers
// ---------------------------------------------------------------------------------------------

inline int64_t offset3(const int64_t* s, int64_t t, int64_t h) { return t * s[0] + h * s[1]; }

// Rows t0 + j of head h.
inline auto seg_rows(const int64_t* s, int64_t t0, int64_t h) {
  return [s, t0, h](int64_t j) { return offset3(s, t0 + j, h); };
}

template <ElemType T>
inline void pack_rows(const void* x, const int64_t* s, int64_t t0, int64_t h, int64_t N,
                      int64_t D, int64_t ld, float mul, float* dst) {
  pack_rows_by<T>(x, seg_rows(s, t0, h), s[2], N, N, D, ld, mul, dst);
}

template <ElemType T>
inline void pack_transposed(const void* x, const int64_t* s, int64_t t0, int64_t h, int64_t N,
                            int64_t D, int64_t ld, float* blk, float* dst) {
  pack_transposed_by<T>(x, seg_rows(s, t0, h), s[2], N, D, ld, blk, dst);
}

template <ElemType T>
inline void prefetch_rows(const void* x, const int64_t* s, int64_t t0, int64_t h, int64_t N,
                          int64_t D) {
  prefetch_rows_by<T>(x, seg_rows(s, t0, h), s[2], N, D);
}

// Key mask of a segment of n keys: mask[j] = 0 for j < n, -inf for j in [n, round_up(n, kW)).
inline void fill_key_mask(int64_t n, float* mask) {
  const int64_t np = round_up(n, kW);
  for (int64_t j = 0; j < np; ++j) mask[j] = j < n ? 0.0f : -std::numeric_limits<float>::infinity();
}

// Adds the mask to the last (partial) vector of each of `rows` score rows of ld floats.
inline void mask_scores(float* s, int64_t rows, int64_t ld, int64_t n, const float* mask) {
  if (n % kW == 0) return;
  const int64_t c = ld - kW;
  const vf m = vload(mask + c);
  for (int64_t r = 0; r < rows; ++r) vstore(s + r * ld + c, vadd(vload(s + r * ld + c), m));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------


// Per-thread forward buffers, sized for the longest segment (Np = round_up(max_seqlen, kW),
// Dp = round_up(D, kW)); a segment of n keys uses leading dimension round_up(n, kW).
struct FwdScratch {
  float* kt;       // k^T [Dp][Np]
  float* vp;       // v [max_seqlen][Dp]
  float* mask;     // key mask [Np]
  float* qs;       // q * scale [kRowGroup<T>][D]
  float* s;        // scores, then probabilities [kRowGroup<T>][Np]
  float* o;        // output rows [kRowGroup<T>][Dp]
  float* row_sum;  // softmax denominators, then their inverses [kRowGroup<T>]
  float* lse;      // row maxima, then lse [kRowGroup<T>]
  float* blk;      // transpose staging [kW][Dp]
  uint32_t* kt16;  // bf16 twins of kt and vp (bf16 products only, else null)
  uint32_t* vp16;

  template <ElemType T>
  int64_t carve(float* base, int64_t N, int64_t D) {
    const int64_t Np = round_up(N, kW), Dp = round_up(D, kW);
    Carver c(base);
    kt = c.take(Dp * Np);
    vp = c.take(N * Dp);
    kt16 = take_twin<T>(c, D, Np);
    vp16 = take_twin<T>(c, N, Dp);
    mask = c.take(Np);
    qs = c.take(kRowGroup<T> * D);
    s = c.take(kRowGroup<T> * Np);
    o = c.take(kRowGroup<T> * Dp);
    row_sum = c.take(kRowGroup<T>);
    lse = c.take(kRowGroup<T>);
    blk = c.take(kW * Dp);
    return c.used();
  }
};

// Query rows [i0, i0 + rows) (inside the segment [start, start + n)) of head h, with k^T / v /
// the mask already packed.
template <ElemType T>
inline void forward_rows(const VarlenAttentionFwdArgs& a, int64_t start, int64_t n, int64_t h,
                         int64_t i0, int64_t rows, const FwdScratch& w) {
  const int64_t H = a.H, D = a.D;
  const int64_t Np = round_up(n, kW), Dp = round_up(D, kW);
  const ScalePlacement sc = scale_placement<T>(a.scale);
  for (int64_t r = 0; r < rows; ++r)
    load_row<T>(a.q, offset3(a.q_stride, start + i0 + r, h), a.q_stride[2], D, sc.operand,
                w.qs + r * D);

  // S = (q * scale) k^T (bf16 products: (q k^T) * scale), key padding masked to -inf.
  ScaleStoreEpi s_epi{w.s, Np, sc.result};
  product<T>(rows, Np / kW, D, w.qs, D, 1, w.kt, Np, w.kt16, nullptr, 0, s_epi);
  mask_scores(w.s, rows, Np, n, w.mask);

  // Softmax numerators in place; lse and 1 / sum per row.
  softmax_rows(w.s, rows, Np, kRowGroup<T>, w.lse, w.row_sum);
  for (int64_t r = 0; r < rows; ++r) a.lse[(start + i0 + r) * H + h] = w.lse[r];

  // O = P v / sum, stored in the output dtype.
  RowScaleEpi o_epi{w.o, Dp, w.row_sum};
  product<T>(rows, Dp / kW, n, w.s, Np, 1, w.vp, Dp, w.vp16, nullptr, 0, o_epi);
  for (int64_t r = 0; r < rows; ++r)
    store_row<T>(a.out, ((start + i0 + r) * H + h) * D, D, w.o + r * Dp);
}

template <ElemType T>
inline void forward_impl(const VarlenAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t D = a.D, Dp = round_up(D, kW);
  FwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, a.max_seqlen, D));
  w.carve<T>(mem.data(), a.max_seqlen, D);

  int64_t packed_seg = -1, packed_h = -1;
  for (int64_t ti = task_begin; ti < task_end; ++ti) {
    const VarlenTask& t = a.tasks[ti];
    const int64_t start = a.cu_seqlens[t.seg], n = a.cu_seqlens[t.seg + 1] - start;
    if (t.seg != packed_seg || t.head != packed_h) {
      // Warm the cache for the next (segment, head) while this one computes, then pack this one.
      if (ti + 1 < task_end) {
        const VarlenTask& nt = a.tasks[ti + 1];
        if (nt.seg != t.seg || nt.head != t.head) {
          const int64_t ns = a.cu_seqlens[nt.seg], nn = a.cu_seqlens[nt.seg + 1] - ns;
          prefetch_rows<T>(a.k, a.k_stride, ns, nt.head, nn, D);
          prefetch_rows<T>(a.v, a.v_stride, ns, nt.head, nn, D);
          prefetch_rows<T>(a.q, a.q_stride, ns + nt.q_begin, nt.head,
                           std::min<int64_t>(nt.q_end - nt.q_begin, kRowGroup<T>), D);
        }
      }
      const int64_t Np = round_up(n, kW);
      pack_transposed<T>(a.k, a.k_stride, start, t.head, n, D, Np, w.blk, w.kt);
      pack_rows<T>(a.v, a.v_stride, start, t.head, n, D, Dp, 1.0f, w.vp);
      make_twin<T>(w.kt, Np, D, w.kt16);
      make_twin<T>(w.vp, Dp, n, w.vp16);
      fill_key_mask(n, w.mask);
      packed_seg = t.seg;
      packed_h = t.head;
    }
    for (int64_t i0 = t.q_begin; i0 < t.q_end; i0 += kRowGroup<T>)
      forward_rows<T>(a, start, n, t.head, i0, std::min(kRowGroup<T>, t.q_end - i0), w);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread backward buffers (N: longest segment, QB: query rows per block).
struct BwdScratch {
  float* kt;     // k^T [Dp][Np]
  float* ks;     // k * scale (bf16 products: k) [N][Dp]
  float* vt;     // v^T [Dp][Np]
  float* dk;     // dk accumulator [N][Dp]
  float* dv;     // dv accumulator [N][Dp]
  float* mask;   // key mask [Np]
  float* qs;     // q * scale [QB][Dp]
  float* dout;   // dO [QB][Dp]
  float* p;      // P, then dS [QB][Np]
  float* dq;     // dq rows [QB][Dp]
  float* delta;  // dO . O [QB]
  float* lse;    // [QB]
  float* tmp;    // an out row; transpose staging [kW][Dp]
  uint32_t* kt16;  // bf16 twins of kt, ks, vt (bf16 products only, else null)
  uint32_t* ks16;
  uint32_t* vt16;

  template <ElemType T>
  int64_t carve(float* base, int64_t N, int64_t D, int64_t QB) {
    const int64_t Np = round_up(N, kW), Dp = round_up(D, kW);
    Carver c(base);
    kt = c.take(Dp * Np);
    ks = c.take(N * Dp);
    vt = c.take(Dp * Np);
    dk = c.take(N * Dp);
    dv = c.take(N * Dp);
    mask = c.take(Np);
    qs = c.take(QB * Dp);
    dout = c.take(QB * Dp);
    p = c.take(QB * Np);
    dq = c.take(QB * Dp);
    delta = c.take(QB);
    lse = c.take(QB);
    tmp = c.take(kW * Dp);
    kt16 = take_twin<T>(c, D, Np);
    ks16 = take_twin<T>(c, N, Dp);
    vt16 = take_twin<T>(c, D, Np);
    return c.used();
  }
};

// Query rows [i0, i0 + rows) of the segment [start, start + n), head h: every product, with k / v
// already packed.
template <ElemType T>
inline void backward_rows(const VarlenAttentionBwdArgs& a, int64_t start, int64_t n, int64_t h,
                          int64_t i0, int64_t rows, const BwdScratch& w) {
  const int64_t D = a.D, H = a.H;
  const int64_t Np = round_up(n, kW), Dp = round_up(D, kW);
  const ScalePlacement sc = scale_placement<T>(a.scale);

  // Per row: q * scale (bf16 products: q), dO, delta = dO . O (= rowsum(P * dP)), lse.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = start + i0 + r;
    float* qr = w.qs + r * Dp;
    load_row<T>(a.q, offset3(a.q_stride, t, h), a.q_stride[2], D, sc.operand, qr);
    for (int64_t d = D; d < Dp; ++d) qr[d] = 0.0f;
    float* gr = w.dout + r * Dp;
    load_row<T>(a.grad_out, offset3(a.grad_out_stride, t, h), a.grad_out_stride[2], D, 1.0f, gr);
    load_row<T>(a.out, offset3(a.out_stride, t, h), a.out_stride[2], D, 1.0f, w.tmp);
    for (int64_t d = D; d < Dp; ++d) gr[d] = w.tmp[d] = 0.0f;
    vf dot = vzero();
    for (int64_t c = 0; c < Dp; c += kW) dot = vfma(vload(gr + c), vload(w.tmp + c), dot);
    w.delta[r] = vhsum(dot);
    w.lse[r] = a.lse[t * a.lse_stride[0] + h * a.lse_stride[1]];
  }

  // P = exp(q k^T * scale - lse), zero on the key padding.
  ScaleStoreEpi s_epi{w.p, Np, sc.result};
  product<T>(rows, Np / kW, D, w.qs, Dp, 1, w.kt, Np, w.kt16, nullptr, 0, s_epi);
  mask_scores(w.p, rows, Np, n, w.mask);
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = w.p + r * Np;
    const vf l = vset1(w.lse[r]);
    for (int64_t c = 0; c < Np; c += kW) vstore(pr + c, vexp(vsub(vload(pr + c), l)));
  }

  // dv += P^T dO (A = P read transposed).
  StoreEpi dv_epi{w.dv, Dp};
  product<T>(n, Dp / kW, rows, w.p, 1, Np, w.dout, Dp, nullptr, w.dv, Dp, dv_epi);

  // dS = P * (dO v^T - delta), written over P.
  SoftmaxGradEpi ds_epi{w.p, Np, w.delta};
  product<T>(rows, Np / kW, D, w.dout, Dp, 1, w.vt, Np, w.vt16, nullptr, 0, ds_epi);

  // dq = dS (k * scale).
  StoreEpi dq_epi{w.dq, Dp};
  product<T>(rows, Dp / kW, n, w.p, Np, 1, w.ks, Dp, w.ks16, nullptr, 0, dq_epi);
  for (int64_t r = 0; r < rows; ++r) {
    scale_rows(w.dq + r * Dp, Dp, sc.result);
    store_row<T>(a.dq, ((start + i0 + r) * H + h) * D, D, w.dq + r * Dp);
  }

  // dk += dS^T (q * scale) (with bf16 products, times the scale at the store).
  StoreEpi dk_epi{w.dk, Dp};
  product<T>(n, Dp / kW, rows, w.p, 1, Np, w.qs, Dp, nullptr, w.dk, Dp, dk_epi);
}

// A whole (segment, head): pack k / v, every query block, then store dk / dv.
template <ElemType T>
inline void backward_seg_head(const VarlenAttentionBwdArgs& a, int64_t start, int64_t n,
                              int64_t h, int64_t QB, const BwdScratch& w) {
  const int64_t D = a.D, H = a.H;
  const int64_t Np = round_up(n, kW), Dp = round_up(D, kW);
  const ScalePlacement sc = scale_placement<T>(a.scale);
  pack_transposed<T>(a.k, a.k_stride, start, h, n, D, Np, w.tmp, w.kt);
  pack_rows<T>(a.k, a.k_stride, start, h, n, D, Dp, sc.operand, w.ks);
  pack_transposed<T>(a.v, a.v_stride, start, h, n, D, Np, w.tmp, w.vt);
  make_twin<T>(w.kt, Np, D, w.kt16);
  make_twin<T>(w.ks, Dp, n, w.ks16);
  make_twin<T>(w.vt, Np, D, w.vt16);
  fill_key_mask(n, w.mask);
  std::fill(w.dk, w.dk + n * Dp, 0.0f);
  std::fill(w.dv, w.dv + n * Dp, 0.0f);
  for (int64_t i0 = 0; i0 < n; i0 += QB) backward_rows<T>(a, start, n, h, i0, std::min(QB, n - i0), w);
  for (int64_t j = 0; j < n; ++j) {
    scale_rows(w.dk + j * Dp, Dp, sc.result);
    store_row<T>(a.dk, ((start + j) * H + h) * D, D, w.dk + j * Dp);
    store_row<T>(a.dv, ((start + j) * H + h) * D, D, w.dv + j * Dp);
  }
}

// Tasks cover whole (segment, head) pairs in backward (see VarlenAttentionBwdArgs).
template <ElemType T>
inline void backward_impl(const VarlenAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t D = a.D;
  const int64_t QB = std::max<int64_t>(1, std::min(a.q_block, a.max_seqlen));
  BwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, a.max_seqlen, D, QB));
  w.carve<T>(mem.data(), a.max_seqlen, D, QB);

  for (int64_t ti = task_begin; ti < task_end; ++ti) {
    const VarlenTask& t = a.tasks[ti];
    const int64_t start = a.cu_seqlens[t.seg], n = a.cu_seqlens[t.seg + 1] - start;
    // Warm the cache for the next task's k / v and first query block.
    if (ti + 1 < task_end) {
      const VarlenTask& nt = a.tasks[ti + 1];
      const int64_t ns = a.cu_seqlens[nt.seg], nn = a.cu_seqlens[nt.seg + 1] - ns;
      const int64_t rows = std::min(nn, QB);
      prefetch_rows<T>(a.k, a.k_stride, ns, nt.head, nn, D);
      prefetch_rows<T>(a.v, a.v_stride, ns, nt.head, nn, D);
      prefetch_rows<T>(a.q, a.q_stride, ns, nt.head, rows, D);
      prefetch_rows<T>(a.grad_out, a.grad_out_stride, ns, nt.head, rows, D);
      prefetch_rows<T>(a.out, a.out_stride, ns, nt.head, rows, D);
    }
    backward_seg_head<T>(a, start, n, t.head, QB, w);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: one instantiation per element type
// ---------------------------------------------------------------------------------------------

inline void forward_kernel(const VarlenAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: forward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: forward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_kernel(const VarlenAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

}  // namespace varlen_attention
#endif  // FVK_KERNEL_BODIES
