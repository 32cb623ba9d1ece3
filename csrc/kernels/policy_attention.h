// DynamicViT's keep-policy attention (softmax_with_policy), forward and backward, written once
// over the vocabulary of simd.h. The kernels see only PolicyAttention{Fwd,Bwd}Args: raw pointers,
// element strides, sizes.
//
// Math (fastvit_kernels/reference/policy_attention.py), fp32 statistics and accumulation for every
// element type: S = q k^T * scale, m_i = max_j S, E = exp(S - m), A = E * G with
// G[i, j] = p_j (1 on the diagonal), D_i = sum_j A + eps, O_i = (A v + eps / N sum_j v_j) / D_i.
//
// Key columns come in the caller's per-batch order: kept keys (p != 0) first, then dropped ones
// (see PolicyAttentionInputs). With Nc kept keys and Ncp = round_up(Nc, kW), only the first Ncp
// columns take part in exp / P·V / dS / dq / dk / dv (the dropped keys in [Nc, Ncp) carry a zero
// policy, so they cost a little padding and nothing else); q k^T runs over every column for the
// row max (and so does the backward's E / dO v^T when dpolicy is wanted). A row's diagonal entry
// (G = 1) and its row-argmax entry (the gradient through m) are added one by one when their
// column lies beyond Ncp. All products go through product<T>() of attention_gemm.h, on operands
// packed into fp32 scratch (plus their bf16 twins where bf16 inputs multiply in bf16: the amx
// level, where q and k also stay unscaled and the scale goes onto S, dq and dk in fp32).
//
// Two parts (see isa/kernels.inc): the interface, included normally (include guard; plain data, no
// torch, no intrinsics) and filled by ops/policy_attention.cpp; and the kernel, compiled only where
// isa/kernels.inc includes this header again inside an ISA namespace and target region
// (FVK_KERNEL_BODIES), after simd.h, kernel_common.h and attention_gemm.h.

// =============================================================================================
// Interface
// =============================================================================================

#ifndef FASTVIT_KERNELS_KERNELS_POLICY_ATTENTION_H
#define FASTVIT_KERNELS_KERNELS_POLICY_ATTENTION_H

#include <cstdint>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// Key columns are processed in a per-batch order (see PolicyAttentionInputs::perm), padded to a
// multiple of kPolicyRowAlign floats, so any ISA whose vector width divides it reads whole vectors.
constexpr int64_t kPolicyRowAlign = 16;

// The kernels find the row argmax with key indices held exactly in fp32 lanes, which bounds the
// token count N (far beyond any attention size); D has no limit (scratch is sized at run time).
constexpr int64_t kPolicyMaxTokens = int64_t{1} << 24;

// What forward and backward both read. The caller (ops/policy_attention.cpp) sorts each batch's
// keys into "kept" (policy != 0) first, then dropped, both in ascending order: column c of batch b
// is key perm[b * N + c], key j sits in column pos[b * N + j], and columns [0, n_kept[b]) are the
// kept keys. The kernels compute exp / P·V / dS only over the kept columns (plus the diagonal and
// row-argmax entries, handled one by one), which is what makes the cost fall with the keep ratio.
struct PolicyAttentionInputs {
  int64_t B, H, N, D;
  ElemType dtype;  // of q, k, v (and grad_out, out in backward, and the outputs)
  float scale, eps;
  // Element strides in [b, h, n, d] order (any values).
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  // Column order and policy, see above; ld = round_up(N, kPolicyRowAlign).
  int64_t ld;
  const int32_t* perm;    // [B][N]
  const int32_t* pos;     // [B][N]
  const int32_t* n_kept;  // [B]
  const float* pk;        // [B][ld]: policy of column c's key for c < n_kept[b], else 0
  const float* col_mask;  // [ld]: 0 for c < N, -inf for the padding columns
};

struct PolicyAttentionFwdArgs : PolicyAttentionInputs {
  // Outputs: out with d-stride 1, statistics [B, H, N] with any strides.
  void* out; int64_t out_stride[4];
  float* row_max; int64_t row_max_stride[3];
  float* denom; int64_t denom_stride[3];
  int32_t* row_argmax; int64_t row_argmax_stride[3];
  // Task t covers (b, h) = divmod(t / q_blocks, H) and query rows [(t % q_blocks) * q_block,
  // ...). Tasks of one (b, h) are consecutive, so a thread repacks k / v only when (b, h) changes.
  int64_t q_block, q_blocks;
};

struct PolicyAttentionBwdArgs : PolicyAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[4];
  const void* out; int64_t out_stride[4];
  const float* row_max; int64_t row_max_stride[3];
  const float* denom; int64_t denom_stride[3];
  const int32_t* row_argmax; int64_t row_argmax_stride[3];  // values validated in [0, N)
  // Outputs with d-stride 1.
  void* dq; int64_t dq_stride[4];
  void* dk; int64_t dk_stride[4];
  void* dv; int64_t dv_stride[4];
  // Per-(b, h) dpolicy partial sums [B][H][N] (key order), written in full by task (b, h); the
  // caller sums them over h in order. Null when dpolicy is not needed.
  float* dpolicy_partial;
  // Task t covers (b, h) = divmod(t, H): dk / dv rows have one owner. Query rows are processed in
  // blocks of q_block.
  int64_t q_block;
};

}  // namespace cpu
}  // namespace fastvit_kernels

#endif  // FASTVIT_KERNELS_KERNELS_POLICY_ATTENTION_H

// =============================================================================================
// Kernel (one copy per ISA; entry points forward_kernel / backward_kernel)
// =============================================================================================

#ifdef FVK_KERNEL_BODIES
namespace policy_attention {

static_assert(kPolicyRowAlign % kW == 0, "policy rows must hold whole vectors");

// ---------------------------------------------------------------------------------------------
// Operand layout: x[b, h, perm[c], :] of [B, H, N, D] tensors (column order), through the
// shared packers
// ---------------------------------------------------------------------------------------------

// dst[c * ld + d] = mul * x[b, h, perm[c], d] for c < N, d < D; columns [D, ld) and rows
// [N, rows) zeroed.
template <ElemType T>
inline void pack_rows(const void* x, const int64_t* s, int64_t b, int64_t h, const int32_t* perm,
                      int64_t N, int64_t rows, int64_t D, int64_t ld, float mul, float* dst) {
  const auto row = [s, b, h, perm](int64_t c) { return offset4(s, b, h, perm[c]); };
  pack_rows_by<T>(x, row, s[3], N, rows, D, ld, mul, dst);
}

// dst[d * ld + c] = x[b, h, perm[c], d] (see pack_transposed_by).
template <ElemType T>
inline void pack_transposed(const void* x, const int64_t* s, int64_t b, int64_t h,
                            const int32_t* perm, int64_t N, int64_t D, int64_t ld, float* blk,
                            float* dst) {
  const auto row = [s, b, h, perm](int64_t c) { return offset4(s, b, h, perm[c]); };
  pack_transposed_by<T>(x, row, s[3], N, D, ld, blk, dst);
}

// Op-specific epilogues (StoreEpi and gemm() come from attention_gemm.h).
// C = acc * mul + mask (0 for real keys, -inf for the padding columns); mul: the scale with bf16
// products, else 1 (exact).
struct MaskEpi {
  float* c; int64_t ldc; const float* mask; float mul;
  void operator()(int64_t i, int64_t jv, vf acc) {
    vstore(c + i * ldc + jv * kW, vfma(acc, vset1(mul), vload(mask + jv * kW)));
  }
};
struct GradAEpi {  // acc = dO v^T; C = dA = (acc - delta[i]) / D[i]
  float* c; int64_t ldc; const float* delta; const float* denom;
  void operator()(int64_t i, int64_t jv, vf x) {
    vstore(c + i * ldc + jv * kW, vdiv(vsub(x, vset1(delta[i])), vset1(denom[i])));
  }
};

// exp(x) of one float, by the same vexp as the vector paths.
inline float exp1(float x) {
  float t[kW];
  vstore(t, vexp(vset1(x)));
  return t[0];
}

inline float dot(const float* x, const float* y, int64_t n) {  // n: a whole number of vectors
  vf acc = vzero();
  for (int64_t d = 0; d < n; d += kW) acc = vfma(vload(x + d), vload(y + d), acc);
  return vhsum(acc);
}

// y += alpha * x over n floats (a whole number of vectors).
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const vf a = vset1(alpha);
  for (int64_t d = 0; d < n; d += kW) vstore(y + d, vfma(a, vload(x + d), vload(y + d)));
}

inline int64_t offset3(const int64_t* s, int64_t b, int64_t h, int64_t n) {
  return b * s[0] + h * s[1] + n * s[2];
}

// Column order of batch b (see PolicyAttentionInputs).
struct Columns {
  const int32_t* perm;  // column -> key
  const int32_t* pos;   // key -> column
  const float* pk;      // policy per column (0 from Nc on)
  int64_t Nc, Ncp;
};

inline Columns columns_of(const PolicyAttentionInputs& a, int64_t b) {
  Columns c;
  c.perm = a.perm + b * a.N;
  c.pos = a.pos + b * a.N;
  c.pk = a.pk + b * a.ld;
  c.Nc = a.n_kept[b];
  c.Ncp = round_up(c.Nc, kW);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Larger than any key index (key indices < kPolicyMaxTokens = 2^24 are exact in fp32).
constexpr float kNoKey = 3.0e9f;

// Per-thread forward buffers (ld: columns, Dp: D rounded up to whole vectors).
struct FwdScratch {
  float* kt;     // k^T [Dp][ld], columns in batch order
  float* vp;     // v [ld][Dp], rows in column order (zero beyond N)
  float* vsum;   // sum_j v_j [Dp]
  float* pkrow;  // this batch's pk, with the current row's diagonal set to 1 [ld]
  float* keyf;   // key index of each column as a float, kNoKey for the padding [ld]
  float* qs;     // q * scale [kRowGroup<T>][Dp]
  float* s;      // scores, then A [kRowGroup<T>][ld]
  float* o;      // output rows [kRowGroup<T>][Dp]
  float* blk;    // transpose staging [kW][Dp]
  uint32_t* kt16;  // bf16 twins of kt and vp (bf16 products only, else null)
  uint32_t* vp16;

  template <ElemType T>
  int64_t carve(float* base, int64_t ld, int64_t Dp) {
    Carver c(base);
    kt = c.take(Dp * ld);
    vp = c.take(ld * Dp);
    kt16 = take_twin<T>(c, Dp, ld);
    vp16 = take_twin<T>(c, ld, Dp);
    vsum = c.take(Dp);
    pkrow = c.take(ld);
    keyf = c.take(ld);
    qs = c.take(kRowGroup<T> * Dp);
    s = c.take(kRowGroup<T> * ld);
    o = c.take(kRowGroup<T> * Dp);
    blk = c.take(kW * Dp);
    return c.used();
  }
};

// One group of `rows` query rows [i0, i0 + rows) of (b, h), with k^T / v already packed.
template <ElemType T>
inline void forward_rows(const PolicyAttentionFwdArgs& a, const Columns& col, int64_t b,
                         int64_t h, int64_t i0, int64_t rows, const FwdScratch& w) {
  const int64_t N = a.N, D = a.D, ld = a.ld, Dp = round_up(D, kW), Ncp = col.Ncp;
  const ScalePlacement sc = scale_placement<T>(a.scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* qr = w.qs + r * Dp;
    load_row<T>(a.q, offset4(a.q_stride, b, h, i0 + r), a.q_stride[3], D, sc.operand, qr);
    for (int64_t d = D; d < Dp; ++d) qr[d] = 0.0f;
  }

  // S over every column (the row max sees dropped keys too); padding columns get -inf.
  MaskEpi s_epi{w.s, ld, a.col_mask, sc.result};
  product<T>(rows, ld / kW, Dp, w.qs, Dp, 1, w.kt, ld, w.kt16, nullptr, 0, s_epi);

  float mx_[kRowGroup<T>], den_[kRowGroup<T>], extra_[kRowGroup<T>];
  int64_t arg_[kRowGroup<T>], xcol_[kRowGroup<T>];
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = w.s + r * ld;
    vf mv = vload(sr);
    for (int64_t c = kW; c < ld; c += kW) mv = vmax(mv, vload(sr + c));
    const float m = vhmax(mv);
    // Row argmax: the smallest key index among the columns that reach m (torch.max's choice
    // on ties, e.g. duplicate tokens), lane-wise over the keys' indices as floats.
    const vf m_v = vset1(m);
    vf best = vset1(kNoKey);
    for (int64_t c = 0; c < ld; c += kW)
      best = vmin(vsel_lt(vload(sr + c), m_v, vset1(kNoKey), vload(w.keyf + c)), best);
    const float key = -vhmax(vsub(vzero(), best));
    const int64_t arg = key < static_cast<float>(N) ? static_cast<int64_t>(key) : 0;
    // The diagonal counts with G = 1: inside the exp range through pkrow, else on its own.
    const int64_t pc = col.pos[i0 + r];
    float extra = 0.0f;
    if (pc < Ncp) {
      w.pkrow[pc] = 1.0f;
    } else {
      extra = exp1(sr[pc] - m);
    }
    vf sum = vzero();
    for (int64_t c = 0; c < Ncp; c += kW) {
      const vf e = vmul(vexp(vsub(vload(sr + c), m_v)), vload(w.pkrow + c));
      vstore(sr + c, e);
      sum = vadd(sum, e);
    }
    if (pc < Ncp) w.pkrow[pc] = col.pk[pc];
    mx_[r] = m;
    den_[r] = vhsum(sum) + extra + a.eps;
    extra_[r] = extra;
    arg_[r] = arg;
    xcol_[r] = pc;
  }

  // O = (A v + extra * v_i + eps / N * sum_j v_j) / D.
  StoreEpi o_epi{w.o, Dp};
  product<T>(rows, Dp / kW, Ncp, w.s, ld, 1, w.vp, Dp, w.vp16, nullptr, 0, o_epi);
  const vf eps_n = vset1(a.eps / static_cast<float>(N));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* orow = w.o + r * Dp;
    const vf den = vset1(den_[r]);
    const float* vx = w.vp + xcol_[r] * Dp;
    const vf ex = vset1(extra_[r]);
    for (int64_t d = 0; d < Dp; d += kW) {
      vf x = vload(orow + d);
      if (extra_[r] != 0.0f) x = vfma(ex, vload(vx + d), x);
      x = vfma(eps_n, vload(w.vsum + d), x);
      vstore(orow + d, vdiv(x, den));
    }
    store_row<T>(a.out, offset4(a.out_stride, b, h, i), D, orow);
    a.row_max[offset3(a.row_max_stride, b, h, i)] = mx_[r];
    a.denom[offset3(a.denom_stride, b, h, i)] = den_[r];
    a.row_argmax[offset3(a.row_argmax_stride, b, h, i)] = static_cast<int32_t>(arg_[r]);
  }
}

// Packs k^T, v (column order), sum_j v_j and the policy row of (b, h).
template <ElemType T>
inline void pack_kv(const PolicyAttentionInputs& a, const Columns& col, int64_t b, int64_t h,
                    float* kt, float* vp, float* vsum, float* pkrow, float* blk) {
  const int64_t N = a.N, D = a.D, ld = a.ld, Dp = round_up(D, kW);
  pack_transposed<T>(a.k, a.k_stride, b, h, col.perm, N, D, ld, blk, kt);
  pack_rows<T>(a.v, a.v_stride, b, h, col.perm, N, ld, D, Dp, 1.0f, vp);
  std::fill(vsum, vsum + Dp, 0.0f);
  for (int64_t j = 0; j < N; ++j) {  // key order, as the reference
    const float* vr = vp + static_cast<int64_t>(col.pos[j]) * Dp;
    for (int64_t d = 0; d < Dp; d += kW) vstore(vsum + d, vadd(vload(vsum + d), vload(vr + d)));
  }
  std::copy(col.pk, col.pk + ld, pkrow);
}

template <ElemType T>
inline void forward_impl(const PolicyAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t ld = a.ld, Dp = round_up(a.D, kW);
  FwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, ld, Dp));
  w.carve<T>(mem.data(), ld, Dp);

  int64_t packed_bh = -1;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / a.q_blocks;
    const int64_t b = bh / a.H, h = bh % a.H;
    const Columns col = columns_of(a, b);
    if (bh != packed_bh) {
      pack_kv<T>(a, col, b, h, w.kt, w.vp, w.vsum, w.pkrow, w.blk);
      make_twin<T>(w.kt, ld, Dp, w.kt16);
      make_twin<T>(w.vp, Dp, ld, w.vp16);
      for (int64_t c = 0; c < ld; ++c)
        w.keyf[c] = c < a.N ? static_cast<float>(col.perm[c]) : kNoKey;
      packed_bh = bh;
    }
    const int64_t i_begin = (task % a.q_blocks) * a.q_block;
    const int64_t i_end = std::min(a.N, i_begin + a.q_block);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kRowGroup<T>)
      forward_rows<T>(a, col, b, h, i0, std::min(kRowGroup<T>, i_end - i0), w);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread backward buffers (QB: query rows per block).
struct BwdScratch {
  float* kt;     // k^T [Dp][ld]
  float* ks;     // k * scale (bf16 products: k) [ld][Dp]
  float* vt;     // v^T [Dp][ld]
  float* vp;     // v [ld][Dp]
  float* vbar;   // sum_j v_j, then its mean [Dp]
  float* pkrow;  // [ld], see FwdScratch
  float* dk;     // dk accumulator [ld][Dp] (column order)
  float* dv;     // dv accumulator [ld][Dp]
  float* dpol;   // dpolicy column sums [ld], only with need_dpolicy
  float* csum;   // sum_i dO_i / D_i [Dp]
  float* qs;     // q * scale [QB][Dp]
  float* dout;   // dO [QB][Dp]
  float* dos;    // dO / D [QB][Dp]
  float* e;      // S, then E [QB][ld]
  float* p;      // A, then dS [QB][ld]
  float* da;     // dA [QB][ld]
  float* dq;     // dq rows [QB][Dp]
  float* stat;   // per-row m, D, delta, corr [4][QB]
  float* tmp;    // an out row; transpose staging [kW][Dp]
  uint32_t* kt16;  // bf16 twins of kt, ks, vt (bf16 products only, else null)
  uint32_t* ks16;
  uint32_t* vt16;

  template <ElemType T>
  int64_t carve(float* base, int64_t ld, int64_t Dp, int64_t QB, bool need_dp) {
    Carver c(base);
    kt = c.take(Dp * ld);
    ks = c.take(ld * Dp);
    vt = c.take(Dp * ld);
    vp = c.take(ld * Dp);
    vbar = c.take(Dp);
    pkrow = c.take(ld);
    dk = c.take(ld * Dp);
    dv = c.take(ld * Dp);
    dpol = need_dp ? c.take(ld) : nullptr;
    csum = c.take(Dp);
    qs = c.take(QB * Dp);
    dout = c.take(QB * Dp);
    dos = c.take(QB * Dp);
    e = c.take(QB * ld);
    p = c.take(QB * ld);
    da = c.take(QB * ld);
    dq = c.take(QB * Dp);
    stat = c.take(4 * QB);
    tmp = c.take(kW * Dp);
    kt16 = take_twin<T>(c, Dp, ld);
    ks16 = take_twin<T>(c, ld, Dp);
    vt16 = take_twin<T>(c, Dp, ld);
    return c.used();
  }
};

// Query rows [i0, i0 + rows) of (b, h): every product, with k / v already packed.
template <ElemType T>
inline void backward_rows(const PolicyAttentionBwdArgs& a, const Columns& col, int64_t b,
                          int64_t h, int64_t i0, int64_t rows, int64_t QB, const BwdScratch& w) {
  const int64_t D = a.D, ld = a.ld, Dp = round_up(D, kW), Ncp = col.Ncp;
  const bool need_dp = w.dpol != nullptr;
  const int64_t W = need_dp ? ld : Ncp;  // columns of E and dA
  float* mx = w.stat;
  float* den = w.stat + QB;
  float* delta = w.stat + 2 * QB;
  float* corr = w.stat + 3 * QB;
  const ScalePlacement sc = scale_placement<T>(a.scale);

  // Per row: q * scale, dO, dO / D, delta = dO . out, m, D, and the argmax correction
  // corr = eps (delta - dO . vbar) / D.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* qr = w.qs + r * Dp;
    load_row<T>(a.q, offset4(a.q_stride, b, h, i), a.q_stride[3], D, sc.operand, qr);
    float* gr = w.dout + r * Dp;
    load_row<T>(a.grad_out, offset4(a.grad_out_stride, b, h, i), a.grad_out_stride[3], D, 1.0f,
                gr);
    load_row<T>(a.out, offset4(a.out_stride, b, h, i), a.out_stride[3], D, 1.0f, w.tmp);
    for (int64_t d = D; d < Dp; ++d) qr[d] = gr[d] = w.tmp[d] = 0.0f;
    mx[r] = a.row_max[offset3(a.row_max_stride, b, h, i)];
    den[r] = a.denom[offset3(a.denom_stride, b, h, i)];
    delta[r] = dot(gr, w.tmp, Dp);
    corr[r] = a.eps * (delta[r] - dot(gr, w.vbar, Dp)) / den[r];
    const vf dn = vset1(den[r]);
    float* dr = w.dos + r * Dp;
    for (int64_t d = 0; d < Dp; d += kW) {
      const vf x = vdiv(vload(gr + d), dn);
      vstore(dr + d, x);
      vstore(w.csum + d, vadd(vload(w.csum + d), x));
    }
  }

  // E = exp(S - m) over W columns (padding columns: exp(-inf) = 0).
  MaskEpi s_epi{w.e, ld, a.col_mask, sc.result};
  product<T>(rows, W / kW, Dp, w.qs, Dp, 1, w.kt, ld, w.kt16, nullptr, 0, s_epi);
  for (int64_t r = 0; r < rows; ++r) {
    float* er = w.e + r * ld;
    float* pr = w.p + r * ld;
    const vf m = vset1(mx[r]);
    for (int64_t c = 0; c < W; c += kW) vstore(er + c, vexp(vsub(vload(er + c), m)));
    // A = E * G over the kept columns (the diagonal through pkrow when it lies there).
    const int64_t pc = col.pos[i0 + r];
    if (pc < Ncp) w.pkrow[pc] = 1.0f;
    for (int64_t c = 0; c < Ncp; c += kW) vstore(pr + c, vmul(vload(er + c), vload(w.pkrow + c)));
    if (pc < Ncp) w.pkrow[pc] = col.pk[pc];
  }

  // dv += A^T (dO / D) over the kept columns (A read transposed).
  StoreEpi dv_epi{w.dv, Dp};
  product<T>(Ncp, Dp / kW, rows, w.p, 1, ld, w.dos, Dp, nullptr, w.dv, Dp, dv_epi);

  // dA = (dO v^T - delta) / D over W columns.
  GradAEpi da_epi{w.da, ld, delta, den};
  product<T>(rows, W / kW, Dp, w.dout, Dp, 1, w.vt, ld, w.vt16, nullptr, 0, da_epi);

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* er = w.e + r * ld;
    float* pr = w.p + r * ld;
    const float* dar = w.da + r * ld;
    const int64_t pc = col.pos[i];
    // The diagonal entry beyond the kept columns: E_ii, dA_ii and dS_ii one by one.
    float ds_diag = 0.0f;
    if (pc >= Ncp) {
      float e_ii, da_ii;
      if (need_dp) {
        e_ii = er[pc];
        da_ii = dar[pc];
      } else {
        float s_ii = 0.0f;
        float dp_ii = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          s_ii += w.qs[r * Dp + d] * w.kt[d * ld + pc];
          dp_ii += w.dout[r * Dp + d] * w.vt[d * ld + pc];
        }
        e_ii = exp1(s_ii * sc.result - mx[r]);
        da_ii = (dp_ii - delta[r]) / den[r];
      }
      ds_diag = e_ii * da_ii;
      axpy(e_ii, w.dos + r * Dp, w.dv + pc * Dp, Dp);
    }
    // dpolicy: sum_i E dA over every column but the diagonal.
    if (need_dp) {
      const float e_keep = er[pc];
      er[pc] = 0.0f;
      for (int64_t c = 0; c < ld; c += kW)
        vstore(w.dpol + c, vfma(vload(er + c), vload(dar + c), vload(w.dpol + c)));
      er[pc] = e_keep;
    }
    // dS = A dA over the kept columns, minus the argmax correction.
    for (int64_t c = 0; c < Ncp; c += kW) vstore(pr + c, vmul(vload(pr + c), vload(dar + c)));
    const int64_t ac = col.pos[a.row_argmax[offset3(a.row_argmax_stride, b, h, i)]];
    if (ac < Ncp) pr[ac] -= corr[r];
    // Entries beyond Ncp (diagonal, argmax): their dq / dk terms here, in a fixed order.
    float* dqr = w.dq + r * Dp;
    std::fill(dqr, dqr + Dp, 0.0f);
    const float* qr = w.qs + r * Dp;
    if (pc >= Ncp) {
      axpy(ds_diag, w.ks + pc * Dp, dqr, Dp);
      axpy(ds_diag, qr, w.dk + pc * Dp, Dp);
    }
    if (ac >= Ncp) {
      axpy(-corr[r], w.ks + ac * Dp, dqr, Dp);
      axpy(-corr[r], qr, w.dk + ac * Dp, Dp);
    }
  }

  // dq = dS (k * scale) + the entries above.
  StoreEpi dq_epi{w.dq, Dp};
  product<T>(rows, Dp / kW, Ncp, w.p, ld, 1, w.ks, Dp, w.ks16, w.dq, Dp, dq_epi);
  for (int64_t r = 0; r < rows; ++r) {
    scale_rows(w.dq + r * Dp, Dp, sc.result);
    store_row<T>(a.dq, offset4(a.dq_stride, b, h, i0 + r), D, w.dq + r * Dp);
  }

  // dk += dS^T (q * scale) (with bf16 products, times the scale at the store).
  StoreEpi dk_epi{w.dk, Dp};
  product<T>(Ncp, Dp / kW, rows, w.p, 1, ld, w.qs, Dp, nullptr, w.dk, Dp, dk_epi);
}

// All of (b, h): pack k / v, every query block, then store dk / dv / the dpolicy partial.
template <ElemType T>
inline void backward_bh(const PolicyAttentionBwdArgs& a, int64_t b, int64_t h, int64_t QB,
                        const BwdScratch& w) {
  const int64_t N = a.N, D = a.D, ld = a.ld, Dp = round_up(D, kW);
  const Columns col = columns_of(a, b);
  const ScalePlacement sc = scale_placement<T>(a.scale);
  pack_kv<T>(a, col, b, h, w.kt, w.vp, w.vbar, w.pkrow, w.tmp);
  pack_rows<T>(a.k, a.k_stride, b, h, col.perm, N, ld, D, Dp, sc.operand, w.ks);
  pack_transposed<T>(a.v, a.v_stride, b, h, col.perm, N, D, ld, w.tmp, w.vt);
  make_twin<T>(w.kt, ld, Dp, w.kt16);
  make_twin<T>(w.ks, Dp, ld, w.ks16);
  make_twin<T>(w.vt, ld, Dp, w.vt16);
  const vf inv_n = vset1(1.0f / static_cast<float>(N));
  for (int64_t d = 0; d < Dp; d += kW) vstore(w.vbar + d, vmul(vload(w.vbar + d), inv_n));
  std::fill(w.dk, w.dk + ld * Dp, 0.0f);
  std::fill(w.dv, w.dv + ld * Dp, 0.0f);
  std::fill(w.csum, w.csum + Dp, 0.0f);
  if (w.dpol != nullptr) std::fill(w.dpol, w.dpol + ld, 0.0f);
  for (int64_t i0 = 0; i0 < N; i0 += QB)
    backward_rows<T>(a, col, b, h, i0, std::min(QB, N - i0), QB, w);

  // dv_j += eps / N * sum_i dO_i / D_i for every key.
  const float eps_n = a.eps / static_cast<float>(N);
  for (int64_t j = 0; j < N; ++j) {
    const int64_t c = col.pos[j];
    float* dvr = w.dv + c * Dp;
    axpy(eps_n, w.csum, dvr, Dp);
    scale_rows(w.dk + c * Dp, Dp, sc.result);
    store_row<T>(a.dk, offset4(a.dk_stride, b, h, j), D, w.dk + c * Dp);
    store_row<T>(a.dv, offset4(a.dv_stride, b, h, j), D, dvr);
  }
  if (w.dpol != nullptr) {
    float* out = a.dpolicy_partial + (b * a.H + h) * N;
    for (int64_t j = 0; j < N; ++j) out[j] = w.dpol[col.pos[j]];
  }
}

// Task t: (b, h) = divmod(t, H).
template <ElemType T>
inline void backward_impl(const PolicyAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t ld = a.ld, Dp = round_up(a.D, kW);
  const int64_t QB = std::max<int64_t>(1, std::min(a.q_block, a.N));
  const bool need_dp = a.dpolicy_partial != nullptr;
  BwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, ld, Dp, QB, need_dp));
  w.carve<T>(mem.data(), ld, Dp, QB, need_dp);
  for (int64_t task = task_begin; task < task_end; ++task)
    backward_bh<T>(a, task / a.H, task % a.H, QB, w);
}

// ---------------------------------------------------------------------------------------------
// Entry points: one instantiation per element type
// ---------------------------------------------------------------------------------------------

inline void forward_kernel(const PolicyAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: forward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: forward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_kernel(const PolicyAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

}  // namespace policy_attention
#endif  // FVK_KERNEL_BODIES
