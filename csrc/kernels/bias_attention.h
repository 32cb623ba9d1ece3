// Fused attention with a learned relative-position bias (LeViT), forward and backward, written once
// over the vocabulary of simd.h. The kernels see only BiasAttention{Fwd,Bwd}Args: raw pointers,
// element strides, sizes.
//
// Math (docs/bias_attention.md, "Definition" and "Backward"), fp32 accumulation and softmax
// statistics for every element type:
//   S = q k^T * scale + bias,  P = softmax_j(S),  O = P v,  out = act(O),  lse = log sum_j exp(S)
// Backward: P = softmax_j(S) again (not exp(S - lse)), dO' = dout * act'(O), dP = dO' v^T,
//   delta_i = sum_j P_ij dP_ij, dS = P * (dP - delta),
//   dq = dS k * scale, dk = dS^T q * scale, dv = P^T dO', dtable[h, index[i, j]] += dS[i, j].
//
// Every product goes through product<T>() of attention_gemm.h, on operands packed into fp32
// scratch (plus their bf16 twins where bf16 inputs multiply in bf16: the amx / avx512bf16 levels);
// k/v are repacked only when a thread moves to another (b, h).
//
// Two parts (see isa/kernels.inc): the interface, included normally (include guard; plain data, no
// torch, no intrinsics) and filled by ops/bias_attention.cpp; and the kernel, compiled only where
// isa/kernels.inc includes this header again inside an ISA namespace and target region
// (FVK_KERNEL_BODIES), after simd.h, kernel_common.h and attention_gemm.h.

// =============================================================================================
// Interface
// =============================================================================================

#ifndef FASTVIT_KERNELS_KERNELS_BIAS_ATTENTION_H
#define FASTVIT_KERNELS_KERNELS_BIAS_ATTENTION_H

#include <cstdint>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// The fused epilogue out = act(O) (docs/bias_attention.md, "Definition").
enum class Activation : int { kNone = 0, kHardswish = 1, kSilu = 2 };

// The bias is pre-gathered by the caller as fp32 rows of `bias_ld` floats: row (h, i) starts at
// bias + h * bias_h_stride + i * bias_i_stride. Columns [Nk, bias_ld) hold -inf, which masks the
// kernels' vector padding for free. bias_ld is a multiple of kBiasRowAlign, so any ISA whose
// vector width divides it can read whole vectors. Without a table, a single row of zeros (then
// -inf) is used with both strides 0.
// An additive mask (Swin's shifted windows, docs/bias_attention.md) comes as fp32 rows of the same
// bias_ld, padded with 0: batch b adds row (b % mask_windows, i) at mask + (b % mask_windows) *
// mask_w_stride + i * bias_ld; null without a mask.
constexpr int64_t kBiasRowAlign = 16;

// What forward and backward both read: sizes, the op's settings, q / k / v and the dense bias.
struct BiasAttentionInputs {
  int64_t B, H, Nq, Nk, Dk, Dv;
  ElemType dtype;  // of q, k, v, grad_out, o_pre and the outputs (all the same)
  Activation activation;
  float scale;
  // Element strides in [b, h, n, d] order (any values).
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  const float* bias; int64_t bias_h_stride, bias_i_stride, bias_ld;
  const float* mask; int64_t mask_windows, mask_w_stride;
};

struct BiasAttentionFwdArgs : BiasAttentionInputs {
  // Outputs. out / o_pre must have d-stride 1; o_pre may be null (not saved).
  void* out; int64_t out_stride[4];
  void* o_pre; int64_t o_pre_stride[4];
  float* lse; int64_t lse_stride[3];
  // Work split: task t covers (b, h) = divmod(t / q_blocks, H) and query rows
  // [(t % q_blocks) * q_block, ...). Tasks of one (b, h) are consecutive, so a thread repacks
  // k and v only when its (b, h) changes.
  int64_t q_block, q_blocks;
};

struct BiasAttentionBwdArgs : BiasAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[4];
  const void* o_pre; int64_t o_pre_stride[4];  // read only with an activation
  // (No lse: the kernel recomputes each row's softmax from its scores.)
  // Dense validated index [Nq, Nk] (values in [0, T)) and the per-task dtable partial sums
  // [tasks, 2, T], zero-initialised by the caller; both null when there is no table.
  const int32_t* index; int64_t T; float* dtable_partial;
  // Outputs with d-stride 1.
  void* dq; int64_t dq_stride[4];
  void* dk; int64_t dk_stride[4];
  void* dv; int64_t dv_stride[4];
  // Task t covers head h = t % H and batches [c * b_chunk, (c + 1) * b_chunk) with c = t / H, so
  // dk / dv rows have one owner and dS is summed densely over the chunk before the dtable
  // scatter. b_chunk depends only on the shapes, which keeps dtable bitwise reproducible for any
  // thread count. Query rows are processed in blocks of q_block.
  int64_t b_chunk;
  int64_t q_block;
};

}  // namespace cpu
}  // namespace fastvit_kernels

#endif  // FASTVIT_KERNELS_KERNELS_BIAS_ATTENTION_H

// =============================================================================================
// Kernel (one copy per ISA; entry points forward_kernel / backward_kernel)
// =============================================================================================

#ifdef FVK_KERNEL_BODIES
namespace bias_attention {

static_assert(kBiasRowAlign % kW == 0, "bias rows must hold whole vectors");

// ---------------------------------------------------------------------------------------------
// Operand layout: x[b, h, j, :] of [B, H, N, D] tensors, through the shared packers
// ---------------------------------------------------------------------------------------------

inline auto head_rows(const int64_t* s, int64_t b, int64_t h) {
  return [s, b, h](int64_t j) { return offset4(s, b, h, j); };
}

template <ElemType T>
inline void pack_rows(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                      int64_t D, int64_t ld, float mul, float* dst) {
  pack_rows_by<T>(x, head_rows(s, b, h), s[3], N, N, D, ld, mul, dst);
}

template <ElemType T>
inline void pack_transposed(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                            int64_t D, int64_t ld, float* blk, float* dst) {
  pack_transposed_by<T>(x, head_rows(s, b, h), s[3], N, D, ld, blk, dst);
}

template <ElemType T>
inline void prefetch_rows(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                          int64_t D) {
  prefetch_rows_by<T>(x, head_rows(s, b, h), s[3], N, D);
}

// Epilogue of S: C = acc * mul + X (+ M), the bias and then the mask joining after the dot product
// as in plain PyTorch (starting from the bias adds error); mul is the scale with bf16 products,
// else 1. m is null without a mask.
struct AddStoreEpi {
  float* c; int64_t ldc; const float* x; int64_t ldx; float mul; const float* m; int64_t ldm;
  vf score(int64_t i, int64_t jv, vf acc) const {
    vf s = vfma(acc, vset1(mul), vload(x + i * ldx + jv * kW));
    if (m != nullptr) s = vadd(s, vload(m + i * ldm + jv * kW));
    return s;
  }
  void operator()(int64_t i, int64_t jv, vf acc) { vstore(c + i * ldc + jv * kW, score(i, jv, acc)); }
};

// The epilogue adding (b, h)'s bias and mask rows from query row i0 on, storing into c.
inline AddStoreEpi bias_epilogue(const BiasAttentionInputs& a, int64_t b, int64_t h, int64_t i0,
                                 float* c, int64_t ldc, float mul) {
  const float* m = a.mask == nullptr
                       ? nullptr
                       : a.mask + (b % a.mask_windows) * a.mask_w_stride + i0 * a.bias_ld;
  return AddStoreEpi{c, ldc, a.bias + h * a.bias_h_stride + i0 * a.bias_i_stride, a.bias_i_stride,
                     mul, m, a.bias_ld};
}

// act(x) and act'(x) of the fused epilogue (not called for Activation::kNone).
inline vf activate(Activation act, vf x) {
  return act == Activation::kSilu ? vsilu(x) : vhardswish(x);
}

inline vf activate_grad(Activation act, vf x) {
  return act == Activation::kSilu ? vsilu_grad(x) : vhardswish_grad(x);
}

// x as bf16 products take it (rounded to nearest even), where T's products are bf16; else x.
template <ElemType T>
inline vf as_product_operand(vf x) {
  if constexpr (kBf16Products<T>) {
    uint16_t h[kW];
    vstore_bf16(h, x);
    return vload_bf16(h);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------


// Per-thread forward buffers (Nkp, Dkp, Dvp: sizes rounded up to whole vectors).
struct FwdScratch {
  float* kt;       // k^T [Dkp][Nkp]
  float* vp;       // v [Nk][Dvp]
  float* qs;       // q * scale [kRowGroup<T>][Dk]
  float* s;        // scores, then probabilities [kRowGroup<T>][Nkp]
  float* o;        // output rows [kRowGroup<T>][Dvp]
  float* row_sum;  // softmax denominators, then their inverses [kRowGroup<T>]
  float* lse;      // row maxima, then lse [kRowGroup<T>]
  float* blk;      // transpose staging [kW][Dkp]
  uint32_t* kt16;  // bf16 twins of kt and vp (bf16 products only, else null)
  uint32_t* vp16;
  // Both products on the tiles (bf16 products whose shapes pay for them, see forward_rows_tiles):
  // q and P as bf16 A operands [kRowGroup<T>][k_padded(Dk or Nk)]; else null.
  bool tiles;
  uint16_t* q16;
  uint16_t* p16;
  // With tiles, whether q, k, v pack into those operands straight from their bf16 rows (d-stride
  // 1, Dk even: see bf16_rows_pack_directly) instead of through the fp32 kt / vp / qs.
  bool direct;

  template <ElemType T>
  int64_t carve(float* base, int64_t Nk, int64_t Nkp, int64_t Dk, int64_t Dkp, int64_t Dvp) {
    Carver c(base);
    kt = c.take(Dkp * Nkp);
    vp = c.take(Nk * Dvp);
    kt16 = take_twin<T>(c, Dk, Nkp);
    vp16 = take_twin<T>(c, Nk, Dvp);
    tiles = direct = false;
    q16 = p16 = nullptr;
#if defined(FVK_BF16_PRODUCTS)
    if constexpr (kBf16Products<T>) {
      tiles = tiles_pay(Nkp / kW, Dk) && tiles_pay(Dvp / kW, Nk);
      if (tiles) {
        q16 = reinterpret_cast<uint16_t*>(c.take(kRowGroup<T> * k_padded(Dk) / 2));
        p16 = reinterpret_cast<uint16_t*>(c.take(kRowGroup<T> * k_padded(Nk) / 2));
      }
    }
#endif
    qs = c.take(kRowGroup<T> * Dk);
    s = c.take(kRowGroup<T> * Nkp);
    o = c.take(kRowGroup<T> * Dvp);
    row_sum = c.take(kRowGroup<T>);
    lse = c.take(kRowGroup<T>);
    blk = c.take(kW * Dkp);
    return c.used();
  }
};

// out (and o_pre) of `rows` rows from their fp32 P v rows in w.o, each times row_mul[r].
template <ElemType T>
inline void store_output_rows(const BiasAttentionFwdArgs& a, int64_t b, int64_t h, int64_t i0,
                              int64_t rows, const FwdScratch& w, const float* row_mul) {
  const int64_t Dv = a.Dv, Dvp = round_up(Dv, kW);
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = w.o + r * Dvp;
    if (row_mul != nullptr) scale_rows(orow, Dvp, row_mul[r]);
    if (a.o_pre != nullptr)
      store_row<T>(a.o_pre, offset4(a.o_pre_stride, b, h, i0 + r), Dv, orow);
    if (a.activation != Activation::kNone)
      for (int64_t c = 0; c < Dvp; c += kW)
        vstore(orow + c, activate(a.activation, vload(orow + c)));
    store_row<T>(a.out, offset4(a.out_stride, b, h, i0 + r), Dv, orow);
  }
}

#if defined(FVK_BF16_PRODUCTS)
// Whether the tile operands can be packed from q, k, v's own bf16 rows: unit d-stride, and k's
// rows an even number of elements (its VNNI twin takes pairs of d as 32-bit words).
inline bool bf16_rows_pack_directly(const BiasAttentionInputs& a) {
  return a.q_stride[3] == 1 && a.k_stride[3] == 1 && a.v_stride[3] == 1 && a.Dk % 2 == 0;
}

inline auto bf16_head_rows(const void* x, const int64_t* s, int64_t b, int64_t h) {
  return [x, s, b, h](int64_t j) { return static_cast<const uint16_t*>(x) + offset4(s, b, h, j); };
}

// forward_rows with both products on the tiles (FwdScratch::tiles), the arithmetic of the
// gemm_bf16 route but for the exponential (softmax_rows_bf16): the raw q k^T tiles are stored
// straight into the score rows, one pass makes them scores (acc * scale + bias + mask, as
// AddStoreEpi) and takes the row maxima, the softmax writes P as the bf16 operand of P v, and the
// P v tiles land in the output rows, scaled by 1 / sum while they are stored. This skips the fp32
// P, its repacking and two bounces through a stack block per tile block: the overhead around the
// tile products at LeViT's sizes (docs/bias_attention.md, "Numerics").
template <ElemType T>
inline void forward_rows_tiles(const BiasAttentionFwdArgs& a, int64_t b, int64_t h, int64_t i0,
                               int64_t rows, const FwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dvp = round_up(Dv, kW);
  if (w.direct) {
    const auto q_rows = bf16_head_rows(a.q, a.q_stride, b, h);
    pack_a_rows_bf16([&](int64_t r) { return q_rows(i0 + r); }, rows, Dk, w.q16);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      load_row<T>(a.q, offset4(a.q_stride, b, h, i0 + r), a.q_stride[3], Dk, 1.0f, w.qs + r * Dk);
    pack_a_rows(w.qs, Dk, rows, Dk, w.q16);
  }
  tiles_product(rows, Nkp / kW, Dk, w.q16, w.kt16, Nkp, w.s, Nkp);

  const AddStoreEpi epi = bias_epilogue(a, b, h, i0, w.s, Nkp, a.scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = w.s + r * Nkp;
    vf mx = vset1(-INFINITY);
    for (int64_t jv = 0; jv < Nkp / kW; ++jv) {
      const vf x = epi.score(r, jv, vload(sr + jv * kW));
      vstore(sr + jv * kW, x);
      mx = vmax(mx, x);
    }
    w.lse[r] = vhmax(mx);
  }
  softmax_rows_bf16(w.s, rows, Nkp, Nk, kRowGroup<T>, w.lse, w.row_sum, w.p16);
  for (int64_t r = 0; r < rows; ++r)
    a.lse[b * a.lse_stride[0] + h * a.lse_stride[1] + (i0 + r) * a.lse_stride[2]] = w.lse[r];

  tiles_product(rows, Dvp / kW, Nk, w.p16, w.vp16, Dvp, w.o, Dvp);
  store_output_rows<T>(a, b, h, i0, rows, w, w.row_sum);
}

// The twins k^T and v of (b, h) straight from their bf16 rows (FwdScratch::direct).
inline void pack_bf16_twins(const BiasAttentionFwdArgs& a, int64_t b, int64_t h, const FwdScratch& w) {
  const int64_t Nkp = round_up(a.Nk, kW), Dvp = round_up(a.Dv, kW);
  pack_vnni_transposed_bf16(bf16_head_rows(a.k, a.k_stride, b, h), a.Nk, a.Dk, Nkp, w.kt16);
  pack_vnni_rows_bf16(bf16_head_rows(a.v, a.v_stride, b, h), a.Nk, a.Dv, Dvp, w.vp16);
}
#else
inline void pack_bf16_twins(const BiasAttentionFwdArgs&, int64_t, int64_t, const FwdScratch&) {}
#endif

// One group of `rows` query rows [i0, i0 + rows) of (b, h), with k^T / v already packed.
template <ElemType T>
inline void forward_rows(const BiasAttentionFwdArgs& a, int64_t b, int64_t h, int64_t i0,
                         int64_t rows, const FwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dvp = round_up(Dv, kW);
#if defined(FVK_BF16_PRODUCTS)
  if constexpr (kBf16Products<T>) {
    if (w.tiles) return forward_rows_tiles<T>(a, b, h, i0, rows, w);
  }
#endif
  const ScalePlacement sc = scale_placement<T>(a.scale);
  for (int64_t r = 0; r < rows; ++r)
    load_row<T>(a.q, offset4(a.q_stride, b, h, i0 + r), a.q_stride[3], Dk, sc.operand,
                w.qs + r * Dk);

  // S = (q * scale) k^T + bias; the bias rows' -inf padding masks columns >= Nk.
  AddStoreEpi s_epi = bias_epilogue(a, b, h, i0, w.s, Nkp, sc.result);
  product<T>(rows, Nkp / kW, Dk, w.qs, Dk, 1, w.kt, Nkp, w.kt16, nullptr, 0, s_epi);

  // Softmax numerators in place; lse and 1 / sum per row.
  softmax_rows(w.s, rows, Nkp, kRowGroup<T>, w.lse, w.row_sum);
  for (int64_t r = 0; r < rows; ++r)
    a.lse[b * a.lse_stride[0] + h * a.lse_stride[1] + (i0 + r) * a.lse_stride[2]] = w.lse[r];

  // O = P v / sum, then o_pre, the activation, and the store in the output dtype.
  RowScaleEpi o_epi{w.o, Dvp, w.row_sum};
  product<T>(rows, Dvp / kW, Nk, w.s, Nkp, 1, w.vp, Dvp, w.vp16, nullptr, 0, o_epi);
  store_output_rows<T>(a, b, h, i0, rows, w, nullptr);
}

template <ElemType T>
inline void forward_impl(const BiasAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dkp = round_up(Dk, kW), Dvp = round_up(Dv, kW);
  FwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, Nk, Nkp, Dk, Dkp, Dvp));
  w.carve<T>(mem.data(), Nk, Nkp, Dk, Dkp, Dvp);
#if defined(FVK_BF16_PRODUCTS)
  w.direct = w.tiles && bf16_rows_pack_directly(a);
#endif

  int64_t packed_bh = -1;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / a.q_blocks;
    const int64_t b = bh / a.H, h = bh % a.H;
    if (bh != packed_bh) {
      // Warm the cache for the next (b, h) while this one computes, then pack this one.
      const int64_t next_bh = (task + 1) / a.q_blocks;
      if (task + 1 < task_end && next_bh != bh) {
        const int64_t nb = next_bh / a.H, nh = next_bh % a.H;
        prefetch_rows<T>(a.k, a.k_stride, nb, nh, Nk, Dk);
        prefetch_rows<T>(a.v, a.v_stride, nb, nh, Nk, Dv);
        prefetch_rows<T>(a.q, a.q_stride, nb, nh, std::min(a.Nq, a.q_block), Dk);
      }
      if (w.direct) {
        pack_bf16_twins(a, b, h, w);
      } else {
        pack_transposed<T>(a.k, a.k_stride, b, h, Nk, Dk, Nkp, w.blk, w.kt);
        pack_rows<T>(a.v, a.v_stride, b, h, Nk, Dv, Dvp, 1.0f, w.vp);
        make_twin<T>(w.kt, Nkp, Dk, w.kt16);
        make_twin<T>(w.vp, Dvp, Nk, w.vp16);
      }
      packed_bh = bh;
    }
    const int64_t i_begin = (task % a.q_blocks) * a.q_block;
    const int64_t i_end = std::min(a.Nq, i_begin + a.q_block);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kRowGroup<T>)
      forward_rows<T>(a, b, h, i0, std::min(kRowGroup<T>, i_end - i0), w);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread backward buffers (QB: query rows per block).
struct BwdScratch {
  float* kt;      // k^T [Dkp][Nkp]
  float* ks;      // k * scale (bf16 products: k) [Nk][Dkp]
  float* vt;      // v^T [Dvp][Nkp]
  float* dk;      // dk accumulator [Nk][Dkp]
  float* dv;      // dv accumulator [Nk][Dvp]
  float* qs;      // q * scale [QB][Dkp]
  float* dout;    // dO' [QB][Dvp]
  float* p;       // P, then dS [QB][Nkp]
  float* dp;      // dP [QB][Nkp]
  float* dq;      // dq rows [QB][Dkp]
  float* row_max;  // the softmax statistics of a block's rows [round_up(QB, kW)]
  float* inv_sum;  // [round_up(QB, kW)]
  float* tmp;     // an o_pre row; transpose staging [kW][max(Dkp, Dvp)]
  float* ds_sum;  // dS summed over a task's batches [Nq][Nkp], only with a table
  uint32_t* kt16;  // bf16 twins of kt, ks, vt (bf16 products only, else null)
  uint32_t* ks16;
  uint32_t* vt16;

  template <ElemType T>
  int64_t carve(float* base, const BiasAttentionBwdArgs& a, int64_t QB) {
    const int64_t Nkp = round_up(a.Nk, kW), Dkp = round_up(a.Dk, kW), Dvp = round_up(a.Dv, kW);
    Carver c(base);
    kt = c.take(Dkp * Nkp);
    ks = c.take(a.Nk * Dkp);
    vt = c.take(Dvp * Nkp);
    dk = c.take(a.Nk * Dkp);
    dv = c.take(a.Nk * Dvp);
    qs = c.take(QB * Dkp);
    dout = c.take(QB * Dvp);
    p = c.take(QB * Nkp);
    dp = c.take(QB * Nkp);
    dq = c.take(QB * Dkp);
    row_max = c.take(round_up(QB, kW));
    inv_sum = c.take(round_up(QB, kW));
    tmp = c.take(kW * std::max(Dkp, Dvp));
    ds_sum = a.index != nullptr ? c.take(a.Nq * Nkp) : nullptr;
    kt16 = take_twin<T>(c, a.Dk, Nkp);
    ks16 = take_twin<T>(c, a.Nk, Dkp);
    vt16 = take_twin<T>(c, a.Dv, Nkp);
    return c.used();
  }
};

// Query rows [i0, i0 + rows) of (b, h): every product, with k / v already packed.
template <ElemType T>
inline void backward_rows(const BiasAttentionBwdArgs& a, int64_t b, int64_t h, int64_t i0,
                          int64_t rows, const BwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dkp = round_up(Dk, kW), Dvp = round_up(Dv, kW);
  const ScalePlacement sc = scale_placement<T>(a.scale);

  // Per row: q * scale, dO' = dout * act'(o_pre).
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* qr = w.qs + r * Dkp;
    load_row<T>(a.q, offset4(a.q_stride, b, h, i), a.q_stride[3], Dk, sc.operand, qr);
    for (int64_t d = Dk; d < Dkp; ++d) qr[d] = 0.0f;
    float* gr = w.dout + r * Dvp;
    load_row<T>(a.grad_out, offset4(a.grad_out_stride, b, h, i), a.grad_out_stride[3], Dv, 1.0f,
                gr);
    for (int64_t d = Dv; d < Dvp; ++d) gr[d] = 0.0f;
    if (a.activation != Activation::kNone) {
      load_row<T>(a.o_pre, offset4(a.o_pre_stride, b, h, i), a.o_pre_stride[3], Dv, 1.0f, w.tmp);
      for (int64_t d = Dv; d < Dvp; ++d) w.tmp[d] = 0.0f;
      for (int64_t c = 0; c < Dvp; c += kW) {
        // With bf16 products dO' enters dP = dO' v^T in bf16 (grad_out itself is already bf16).
        vstore(gr + c, as_product_operand<T>(
                           vmul(vload(gr + c), activate_grad(a.activation, vload(w.tmp + c)))));
      }
    }
  }

  // P = softmax(q k^T * scale + bias), from each row's own max and sum rather than
  // exp(S - lse) with the forward's lse: an fp32 lse of magnitude ~30 (large scores) is off by
  // up to 1e-6 absolute, and that error would enter every P (docs/bias_attention.md, "Backward").
  // The rows are whole here, so the softmax costs one more pass over them.
  AddStoreEpi s_epi = bias_epilogue(a, b, h, i0, w.p, Nkp, sc.result);
  product<T>(rows, Nkp / kW, Dk, w.qs, Dkp, 1, w.kt, Nkp, w.kt16, nullptr, 0, s_epi);
  softmax_rows(w.p, rows, Nkp, round_up(rows, kW), w.row_max, w.inv_sum);
  for (int64_t r = 0; r < rows; ++r) scale_rows(w.p + r * Nkp, Nkp, w.inv_sum[r]);

  // dv += P^T dO' (A = P read transposed).
  StoreEpi dv_epi{w.dv, Dvp};
  product<T>(Nk, Dvp / kW, rows, w.p, 1, Nkp, w.dout, Dvp, nullptr, w.dv, Dvp, dv_epi);

  // dP = dO' v^T; delta = rowsum(P * dP) from these same P and dP (not dO' . O, the form
  // attention kernels that tile keys use): near one-hot rows make dP - delta a cancellation, and
  // only a consistent delta keeps its error relative to the difference
  // (docs/bias_attention.md, "Backward"). Then dS = P * (dP - delta), written over P.
  StoreEpi dp_epi{w.dp, Nkp};
  product<T>(rows, Nkp / kW, Dv, w.dout, Dvp, 1, w.vt, Nkp, w.vt16, nullptr, 0, dp_epi);
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = w.p + r * Nkp;
    const float* dpr = w.dp + r * Nkp;
    vf dot = vzero();
    for (int64_t c = 0; c < Nkp; c += kW) dot = vfma(vload(pr + c), vload(dpr + c), dot);
    const vf delta = vset1(vhsum(dot));
    for (int64_t c = 0; c < Nkp; c += kW)
      vstore(pr + c, vmul(vload(pr + c), vsub(vload(dpr + c), delta)));
  }

  // dq = dS (k * scale).
  StoreEpi dq_epi{w.dq, Dkp};
  product<T>(rows, Dkp / kW, Nk, w.p, Nkp, 1, w.ks, Dkp, w.ks16, nullptr, 0, dq_epi);
  for (int64_t r = 0; r < rows; ++r) {
    scale_rows(w.dq + r * Dkp, Dkp, sc.result);
    store_row<T>(a.dq, offset4(a.dq_stride, b, h, i0 + r), Dk, w.dq + r * Dkp);
  }

  // dk += dS^T (q * scale) (with bf16 products, times the scale at the store).
  StoreEpi dk_epi{w.dk, Dkp};
  product<T>(Nk, Dkp / kW, rows, w.p, 1, Nkp, w.qs, Dkp, nullptr, w.dk, Dkp, dk_epi);

  // dS summed densely over the task's batches; scattered into dtable once per task.
  if (w.ds_sum != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      float* acc = w.ds_sum + (i0 + r) * Nkp;
      const float* ds = w.p + r * Nkp;
      for (int64_t c = 0; c < Nkp; c += kW) vstore(acc + c, vadd(vload(acc + c), vload(ds + c)));
    }
  }
}

// All of (b, h): pack k / v, every query block, then store dk / dv.
template <ElemType T>
inline void backward_bh(const BiasAttentionBwdArgs& a, int64_t b, int64_t h, int64_t QB,
                        const BwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dkp = round_up(Dk, kW), Dvp = round_up(Dv, kW);
  const ScalePlacement sc = scale_placement<T>(a.scale);
  pack_transposed<T>(a.k, a.k_stride, b, h, Nk, Dk, Nkp, w.tmp, w.kt);
  pack_rows<T>(a.k, a.k_stride, b, h, Nk, Dk, Dkp, sc.operand, w.ks);
  pack_transposed<T>(a.v, a.v_stride, b, h, Nk, Dv, Nkp, w.tmp, w.vt);
  make_twin<T>(w.kt, Nkp, Dk, w.kt16);
  make_twin<T>(w.ks, Dkp, Nk, w.ks16);
  make_twin<T>(w.vt, Nkp, Dv, w.vt16);
  std::fill(w.dk, w.dk + Nk * Dkp, 0.0f);
  std::fill(w.dv, w.dv + Nk * Dvp, 0.0f);
  for (int64_t i0 = 0; i0 < a.Nq; i0 += QB)
    backward_rows<T>(a, b, h, i0, std::min(QB, a.Nq - i0), w);
  for (int64_t j = 0; j < Nk; ++j) {
    scale_rows(w.dk + j * Dkp, Dkp, sc.result);
    store_row<T>(a.dk, offset4(a.dk_stride, b, h, j), Dk, w.dk + j * Dkp);
    store_row<T>(a.dv, offset4(a.dv_stride, b, h, j), Dv, w.dv + j * Dvp);
  }
}

// Task t: head h = t % H over the batches of chunk t / H (see BiasAttentionBwdArgs).
template <ElemType T>
inline void backward_impl(const BiasAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t Nq = a.Nq, Nk = a.Nk, Nkp = round_up(Nk, kW);
  const int64_t QB = std::max<int64_t>(1, std::min(a.q_block, Nq));
  BwdScratch w{};
  AlignedBuffer mem(w.carve<T>(nullptr, a, QB));
  w.carve<T>(mem.data(), a, QB);

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t h = task % a.H;
    const int64_t b_begin = task / a.H * a.b_chunk, b_end = std::min(a.B, b_begin + a.b_chunk);
    if (w.ds_sum != nullptr) std::fill(w.ds_sum, w.ds_sum + Nq * Nkp, 0.0f);
    for (int64_t b = b_begin; b < b_end; ++b) {
      // Warm the cache for the next (b, h): the next batch, or the next task's first.
      const bool last = b + 1 == b_end;
      const int64_t nb = last ? (task + 1) / a.H * a.b_chunk : b + 1;
      const int64_t nh = last ? (task + 1) % a.H : h;
      if (!last || (task + 1 < task_end && nb < a.B)) {
        const int64_t rows = std::min(Nq, QB);
        prefetch_rows<T>(a.k, a.k_stride, nb, nh, Nk, a.Dk);
        prefetch_rows<T>(a.v, a.v_stride, nb, nh, Nk, a.Dv);
        prefetch_rows<T>(a.q, a.q_stride, nb, nh, rows, a.Dk);
        prefetch_rows<T>(a.grad_out, a.grad_out_stride, nb, nh, rows, a.Dv);
        prefetch_rows<T>(a.o_pre, a.o_pre_stride, nb, nh, rows, a.Dv);
      }
      backward_bh<T>(a, b, h, QB, w);
    }

    // dtable[h, index[i, j]] += dS[i, j] into this task's own partial rows (no atomics). Two
    // interleaved rows keep neighbouring equal indices from serialising on store forwarding.
    if (w.ds_sum != nullptr) {
      float* dt0 = a.dtable_partial + task * 2 * a.T;
      float* dt1 = dt0 + a.T;
      for (int64_t i = 0; i < Nq; ++i) {
        const int32_t* idx = a.index + i * Nk;
        const float* ds = w.ds_sum + i * Nkp;
        int64_t j = 0;
        for (; j + 2 <= Nk; j += 2) {
          dt0[idx[j]] += ds[j];
          dt1[idx[j + 1]] += ds[j + 1];
        }
        if (j < Nk) dt0[idx[j]] += ds[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: one instantiation per element type
// ---------------------------------------------------------------------------------------------

inline void forward_kernel(const BiasAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: forward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: forward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_kernel(const BiasAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

}  // namespace bias_attention
#endif  // FVK_KERNEL_BODIES
