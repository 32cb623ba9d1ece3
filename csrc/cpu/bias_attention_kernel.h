// Fused attention with a learned relative-position bias (LeViT), forward and backward, written once
// over the vocabulary of simd.h. Included inside an ISA namespace by
// bias_attention_{avx512,avx2,scalar}.cpp after simd.h (see simd.h for why nothing is included
// here). The kernels see only BiasAttention{Fwd,Bwd}Args: raw pointers, element strides, sizes.
//
// Math (SPEC.md §1-2), fp32 accumulation and softmax statistics for every element type:
//   S = q k^T * scale + bias,  P = softmax_j(S),  O = P v,  out = act(O),  lse = log sum_j exp(S)
// Backward: dO' = dout * act'(O), delta_i = dO'_i . O_i, dP = dO' v^T, dS = P * (dP - delta),
//   dq = dS k * scale, dk = dS^T q * scale, dv = P^T dO', dtable[h, index[i, j]] += dS[i, j].
//
// Every product goes through one register-blocked micro-kernel, gemm(): C = A * B (+ C0) with A
// read element-wise through two strides (so A^T costs nothing) and B / C as rows of whole vectors.
// Operands are packed into fp32 scratch first, which converts bf16 / fp16 once and makes any input
// strides free; k/v are repacked only when a thread moves to another (b, h).

#include "kernel_common.h"  // round_up, Carver, Elem, store_row

static_assert(kBiasRowAlign % kW == 0, "bias rows must hold whole vectors");
static_assert(kMaxMR <= 8 && kMaxNV <= 4, "gemm_tile dispatch covers MR <= 8, NV <= 4");

// ---------------------------------------------------------------------------------------------
// Scratch memory and element access
// ---------------------------------------------------------------------------------------------

// One 64-byte aligned fp32 allocation per kernel call (per thread).
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t floats) {
    const int64_t n = round_up(std::max<int64_t>(floats, 16), 16);  // aligned_alloc: size % 64 == 0
    data_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * sizeof(float)));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
};

// dst[d] = mul * src[off + d * stride] for d < n, converted to fp32.
template <ElemType T>
inline void load_row(const void* src, int64_t off, int64_t stride, int64_t n, float mul,
                     float* dst) {
  using E = Elem<T>;
  const typename E::type* s = static_cast<const typename E::type*>(src) + off;
  int64_t d = 0;
  if (stride == 1) {
    const vf m = vset1(mul);
    for (; d + kW <= n; d += kW) vstore(dst + d, vmul(m, E::load(s + d)));
  }
  for (; d < n; ++d) dst[d] = mul * E::to_f32(s[d * stride]);
}

inline int64_t offset4(const int64_t* s, int64_t b, int64_t h, int64_t n) {
  return b * s[0] + h * s[1] + n * s[2];
}

// dst[j * ld + d] = mul * x[b, h, j, d] for j < N, d < D; columns [D, ld) zeroed.
template <ElemType T>
inline void pack_rows(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                      int64_t D, int64_t ld, float mul, float* dst) {
  for (int64_t j = 0; j < N; ++j) {
    float* row = dst + j * ld;
    load_row<T>(x, offset4(s, b, h, j), s[3], D, mul, row);
    for (int64_t d = D; d < ld; ++d) row[d] = 0.0f;
  }
}

// dst[d * ld + j] = x[b, h, j, d] for j < N, d < D, zero for j in [N, ld) and for the padding
// rows d in [D, round_up(D, kW)) that dst must also hold. Rows go kW at a time through `blk`
// (kW * round_up(D, kW) floats) and are transposed in registers.
template <ElemType T>
inline void pack_transposed(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                            int64_t D, int64_t ld, float* blk, float* dst) {
  const int64_t Dp = round_up(D, kW);
  for (int64_t j0 = 0; j0 < ld; j0 += kW) {
    for (int64_t r = 0; r < kW; ++r) {
      float* row = blk + r * Dp;
      int64_t d = 0;
      if (j0 + r < N) {
        load_row<T>(x, offset4(s, b, h, j0 + r), s[3], D, 1.0f, row);
        d = D;
      }
      for (; d < Dp; ++d) row[d] = 0.0f;
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += kW) transpose_block(blk + d0, Dp, dst + d0 * ld + j0, ld);
  }
}

// Prefetch rows [0, N) of x[b, h, :, 0:D] for the next task, so its packing finds them in cache:
// per-head rows of a fused qkv buffer are scattered and the hardware prefetchers miss them
// (measured ~15% at LeViT batch 64).
template <ElemType T>
inline void prefetch_rows(const void* x, const int64_t* s, int64_t b, int64_t h, int64_t N,
                          int64_t D) {
  const int64_t esize = sizeof(typename Elem<T>::type);
  const char* base = static_cast<const char*>(x);
  for (int64_t r = 0; r < N; ++r) {
    const char* row = base + offset4(s, b, h, r) * esize;
    for (int64_t d = 0; d < D; d += 64 / esize) prefetch(row + d * s[3] * esize);
  }
}

// ---------------------------------------------------------------------------------------------
// The GEMM micro-kernel
// ---------------------------------------------------------------------------------------------

// C[i, :] = sum_k A[i * ars + k * acs] * B[k * ldb + :] (+ C0[i * ldc0 + :]) for a tile of MR
// rows and NV vectors; the epilogue functor receives each finished accumulator.
struct TileArgs {
  int64_t K;
  const float* A; int64_t ars, acs;
  const float* B; int64_t ldb;
  const float* C0; int64_t ldc0;
  int64_t i0, jv0;  // tile origin, handed to the epilogue (row, vector column)
};

template <int MR, int NV, class Epi>
inline void gemm_tile(const TileArgs& t, Epi& epi) {
  vf acc[MR][NV];
  if (t.C0 != nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = vload(t.C0 + r * t.ldc0 + c * kW);
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = vzero();
  }
  const float* a = t.A;
  const float* b = t.B;
  for (int64_t k = 0; k < t.K; ++k, a += t.acs, b += t.ldb) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = vload(b + c * kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf av = vset1(a[r * t.ars]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = vfma(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) epi(t.i0 + r, t.jv0 + c, acc[r][c]);
}

template <int MR, class Epi>
inline void gemm_tile_nv(int nv, const TileArgs& t, Epi& epi) {
  switch (nv) {
    case 1: if constexpr (MR * 1 <= kMaxAcc) gemm_tile<MR, 1>(t, epi); break;
    case 2: if constexpr (MR * 2 <= kMaxAcc && kMaxNV >= 2) gemm_tile<MR, 2>(t, epi); break;
    case 3: if constexpr (MR * 3 <= kMaxAcc && kMaxNV >= 3) gemm_tile<MR, 3>(t, epi); break;
    case 4: if constexpr (MR * 4 <= kMaxAcc && kMaxNV >= 4) gemm_tile<MR, 4>(t, epi); break;
  }
}

template <class Epi>
inline void gemm_tile_dispatch(int mr, int nv, const TileArgs& t, Epi& epi) {
  switch (mr) {
    case 1: gemm_tile_nv<1>(nv, t, epi); break;
    case 2: if constexpr (kMaxMR >= 2) gemm_tile_nv<2>(nv, t, epi); break;
    case 3: if constexpr (kMaxMR >= 3) gemm_tile_nv<3>(nv, t, epi); break;
    case 4: if constexpr (kMaxMR >= 4) gemm_tile_nv<4>(nv, t, epi); break;
    case 5: if constexpr (kMaxMR >= 5) gemm_tile_nv<5>(nv, t, epi); break;
    case 6: if constexpr (kMaxMR >= 6) gemm_tile_nv<6>(nv, t, epi); break;
    case 7: if constexpr (kMaxMR >= 7) gemm_tile_nv<7>(nv, t, epi); break;
    case 8: if constexpr (kMaxMR >= 8) gemm_tile_nv<8>(nv, t, epi); break;
  }
}

// Split n into the fewest parts of at most `most`, as even as possible; part p has size
// part_size(n, parts, p).
inline int64_t num_parts(int64_t n, int64_t most) { return (n + most - 1) / most; }
inline int64_t part_size(int64_t n, int64_t parts, int64_t p) {
  return n / parts + (p < n % parts ? 1 : 0);
}

// C (M rows x NVt vectors) = A (M x K, strides ars / acs) * B (K rows of ldb floats) (+ C0).
// Column tiles outermost so that a K x NV block of B stays in L1 across the row tiles.
template <class Epi>
inline void gemm(int64_t M, int64_t NVt, int64_t K, const float* A, int64_t ars, int64_t acs,
                 const float* B, int64_t ldb, const float* C0, int64_t ldc0, Epi& epi) {
  const int64_t col_tiles = num_parts(NVt, kMaxNV);
  for (int64_t ct = 0, jv = 0; ct < col_tiles; ++ct) {
    const int nv = static_cast<int>(part_size(NVt, col_tiles, ct));
    const int64_t row_tiles = num_parts(M, std::min(kMaxMR, kMaxAcc / nv));
    for (int64_t rt = 0, i = 0; rt < row_tiles; ++rt) {
      const int mr = static_cast<int>(part_size(M, row_tiles, rt));
      const TileArgs t{K, A + i * ars, ars, acs, B + jv * kW, ldb,
                       C0 != nullptr ? C0 + i * ldc0 + jv * kW : nullptr, ldc0, i, jv};
      gemm_tile_dispatch(mr, nv, t, epi);
      i += mr;
    }
    jv += nv;
  }
}

// Epilogues.
struct StoreEpi {  // C = acc
  float* c; int64_t ldc;
  void operator()(int64_t i, int64_t jv, vf x) { vstore(c + i * ldc + jv * kW, x); }
};
struct AddStoreEpi {  // C = acc + X: the bias joins after the dot product, as in plain PyTorch
  float* c; int64_t ldc; const float* x; int64_t ldx;  // (starting from the bias adds error)
  void operator()(int64_t i, int64_t jv, vf acc) {
    vstore(c + i * ldc + jv * kW, vadd(acc, vload(x + i * ldx + jv * kW)));
  }
};
struct RowScaleEpi {  // C = acc * row_mul[i]
  float* c; int64_t ldc; const float* row_mul;
  void operator()(int64_t i, int64_t jv, vf x) {
    vstore(c + i * ldc + jv * kW, vmul(x, vset1(row_mul[i])));
  }
};
struct SoftmaxGradEpi {  // acc = dP; P <- dS = P * (dP - delta[i]), in place
  float* p; int64_t ldp; const float* delta;
  void operator()(int64_t i, int64_t jv, vf x) {
    float* ptr = p + i * ldp + jv * kW;
    vstore(ptr, vmul(vload(ptr), vsub(x, vset1(delta[i]))));
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Query rows handled together: their scores stay in L1 between the two products.
constexpr int64_t kRowGroup = kW == 1 ? 8 : 2 * kMaxMR;
static_assert(kRowGroup % kW == 0, "row statistics are processed in whole vectors");

// Per-thread forward buffers (Nkp, Dkp, Dvp: sizes rounded up to whole vectors).
struct FwdScratch {
  float* kt;       // k^T [Dkp][Nkp]
  float* vp;       // v [Nk][Dvp]
  float* qs;       // q * scale [kRowGroup][Dk]
  float* s;        // scores, then probabilities [kRowGroup][Nkp]
  float* o;        // output rows [kRowGroup][Dvp]
  float* row_sum;  // softmax denominators, then their inverses [kRowGroup]
  float* lse;      // row maxima, then lse [kRowGroup]
  float* blk;      // transpose staging [kW][Dkp]

  int64_t carve(float* base, int64_t Nk, int64_t Nkp, int64_t Dk, int64_t Dkp, int64_t Dvp) {
    Carver c(base);
    kt = c.take(Dkp * Nkp);
    vp = c.take(Nk * Dvp);
    qs = c.take(kRowGroup * Dk);
    s = c.take(kRowGroup * Nkp);
    o = c.take(kRowGroup * Dvp);
    row_sum = c.take(kRowGroup);
    lse = c.take(kRowGroup);
    blk = c.take(kW * Dkp);
    return c.used();
  }
};

// One group of `rows` query rows [i0, i0 + rows) of (b, h), with k^T / v already packed.
template <ElemType T>
inline void forward_rows(const BiasAttentionFwdArgs& a, int64_t b, int64_t h, int64_t i0,
                         int64_t rows, const FwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dvp = round_up(Dv, kW);
  for (int64_t r = 0; r < rows; ++r)
    load_row<T>(a.q, offset4(a.q_stride, b, h, i0 + r), a.q_stride[3], Dk, a.scale,
                w.qs + r * Dk);

  // S = (q * scale) k^T + bias; the bias rows' -inf padding masks columns >= Nk.
  AddStoreEpi s_epi{w.s, Nkp, a.bias + h * a.bias_h_stride + i0 * a.bias_i_stride,
                    a.bias_i_stride};
  gemm(rows, Nkp / kW, Dk, w.qs, Dk, 1, w.kt, Nkp, nullptr, 0, s_epi);

  // Softmax numerators in place, then lse = max + log(sum) and 1 / sum, a vector of rows at once.
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = w.s + r * Nkp;
    vf mx = vload(sr);
    for (int64_t c = kW; c < Nkp; c += kW) mx = vmax(mx, vload(sr + c));
    const float m = vhmax(mx);
    const vf mv = vset1(m);
    vf sum = vzero();
    for (int64_t c = 0; c < Nkp; c += kW) {
      const vf e = vexp(vsub(vload(sr + c), mv));
      vstore(sr + c, e);
      sum = vadd(sum, e);
    }
    w.lse[r] = m;
    w.row_sum[r] = vhsum(sum);
  }
  for (int64_t r = rows; r < kRowGroup; ++r) w.lse[r] = w.row_sum[r] = 1.0f;
  for (int64_t r = 0; r < kRowGroup; r += kW) {
    const vf l = vload(w.row_sum + r);
    vstore(w.lse + r, vadd(vload(w.lse + r), vlog(l)));
    vstore(w.row_sum + r, vdiv(vset1(1.0f), l));
  }
  for (int64_t r = 0; r < rows; ++r)
    a.lse[b * a.lse_stride[0] + h * a.lse_stride[1] + (i0 + r) * a.lse_stride[2]] = w.lse[r];

  // O = P v / sum, then o_pre, the activation, and the store in the output dtype.
  RowScaleEpi o_epi{w.o, Dvp, w.row_sum};
  gemm(rows, Dvp / kW, Nk, w.s, Nkp, 1, w.vp, Dvp, nullptr, 0, o_epi);
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = w.o + r * Dvp;
    if (a.o_pre != nullptr)
      store_row<T>(a.o_pre, offset4(a.o_pre_stride, b, h, i0 + r), Dv, orow);
    if (a.activation == Activation::kHardswish)
      for (int64_t c = 0; c < Dvp; c += kW) vstore(orow + c, vhardswish(vload(orow + c)));
    store_row<T>(a.out, offset4(a.out_stride, b, h, i0 + r), Dv, orow);
  }
}

template <ElemType T>
inline void forward_impl(const BiasAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dkp = round_up(Dk, kW), Dvp = round_up(Dv, kW);
  FwdScratch w{};
  AlignedBuffer mem(w.carve(nullptr, Nk, Nkp, Dk, Dkp, Dvp));
  w.carve(mem.data(), Nk, Nkp, Dk, Dkp, Dvp);

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
      pack_transposed<T>(a.k, a.k_stride, b, h, Nk, Dk, Nkp, w.blk, w.kt);
      pack_rows<T>(a.v, a.v_stride, b, h, Nk, Dv, Dvp, 1.0f, w.vp);
      packed_bh = bh;
    }
    const int64_t i_begin = (task % a.q_blocks) * a.q_block;
    const int64_t i_end = std::min(a.Nq, i_begin + a.q_block);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kRowGroup)
      forward_rows<T>(a, b, h, i0, std::min(kRowGroup, i_end - i0), w);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread backward buffers (QB: query rows per block).
struct BwdScratch {
  float* kt;      // k^T [Dkp][Nkp]
  float* ks;      // k * scale [Nk][Dkp]
  float* vt;      // v^T [Dvp][Nkp]
  float* dk;      // dk accumulator [Nk][Dkp]
  float* dv;      // dv accumulator [Nk][Dvp]
  float* qs;      // q * scale [QB][Dkp]
  float* dout;    // dO' [QB][Dvp]
  float* p;       // P, then dS [QB][Nkp]
  float* dq;      // dq rows [QB][Dkp]
  float* delta;   // dO' . o_pre [QB]
  float* lse;     // [QB]
  float* tmp;     // an o_pre row; transpose staging [kW][max(Dkp, Dvp)]
  float* ds_sum;  // dS summed over a task's batches [Nq][Nkp], only with a table

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
    dq = c.take(QB * Dkp);
    delta = c.take(QB);
    lse = c.take(QB);
    tmp = c.take(kW * std::max(Dkp, Dvp));
    ds_sum = a.index != nullptr ? c.take(a.Nq * Nkp) : nullptr;
    return c.used();
  }
};

// Query rows [i0, i0 + rows) of (b, h): every product, with k / v already packed.
template <ElemType T>
inline void backward_rows(const BiasAttentionBwdArgs& a, int64_t b, int64_t h, int64_t i0,
                          int64_t rows, const BwdScratch& w) {
  const int64_t Nk = a.Nk, Dk = a.Dk, Dv = a.Dv;
  const int64_t Nkp = round_up(Nk, kW), Dkp = round_up(Dk, kW), Dvp = round_up(Dv, kW);

  // Per row: q * scale, dO' = dout * act'(o_pre), delta = dO' . o_pre (= rowsum(P * dP)), lse.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* qr = w.qs + r * Dkp;
    load_row<T>(a.q, offset4(a.q_stride, b, h, i), a.q_stride[3], Dk, a.scale, qr);
    for (int64_t d = Dk; d < Dkp; ++d) qr[d] = 0.0f;
    float* gr = w.dout + r * Dvp;
    load_row<T>(a.grad_out, offset4(a.grad_out_stride, b, h, i), a.grad_out_stride[3], Dv, 1.0f,
                gr);
    load_row<T>(a.o_pre, offset4(a.o_pre_stride, b, h, i), a.o_pre_stride[3], Dv, 1.0f, w.tmp);
    for (int64_t d = Dv; d < Dvp; ++d) gr[d] = w.tmp[d] = 0.0f;
    vf dot = vzero();
    for (int64_t c = 0; c < Dvp; c += kW) {
      vf g = vload(gr + c);
      const vf x = vload(w.tmp + c);
      if (a.activation == Activation::kHardswish) {
        g = vmul(g, vhardswish_grad(x));
        vstore(gr + c, g);
      }
      dot = vfma(g, x, dot);
    }
    w.delta[r] = vhsum(dot);
    w.lse[r] = a.lse[b * a.lse_stride[0] + h * a.lse_stride[1] + i * a.lse_stride[2]];
  }

  // P = exp(q k^T * scale + bias - lse).
  AddStoreEpi s_epi{w.p, Nkp, a.bias + h * a.bias_h_stride + i0 * a.bias_i_stride,
                    a.bias_i_stride};
  gemm(rows, Nkp / kW, Dk, w.qs, Dkp, 1, w.kt, Nkp, nullptr, 0, s_epi);
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = w.p + r * Nkp;
    const vf l = vset1(w.lse[r]);
    for (int64_t c = 0; c < Nkp; c += kW) vstore(pr + c, vexp(vsub(vload(pr + c), l)));
  }

  // dv += P^T dO' (A = P read transposed).
  StoreEpi dv_epi{w.dv, Dvp};
  gemm(Nk, Dvp / kW, rows, w.p, 1, Nkp, w.dout, Dvp, w.dv, Dvp, dv_epi);

  // dS = P * (dO' v^T - delta), written over P.
  SoftmaxGradEpi ds_epi{w.p, Nkp, w.delta};
  gemm(rows, Nkp / kW, Dv, w.dout, Dvp, 1, w.vt, Nkp, nullptr, 0, ds_epi);

  // dq = dS (k * scale).
  StoreEpi dq_epi{w.dq, Dkp};
  gemm(rows, Dkp / kW, Nk, w.p, Nkp, 1, w.ks, Dkp, nullptr, 0, dq_epi);
  for (int64_t r = 0; r < rows; ++r)
    store_row<T>(a.dq, offset4(a.dq_stride, b, h, i0 + r), Dk, w.dq + r * Dkp);

  // dk += dS^T (q * scale).
  StoreEpi dk_epi{w.dk, Dkp};
  gemm(Nk, Dkp / kW, rows, w.p, 1, Nkp, w.qs, Dkp, w.dk, Dkp, dk_epi);

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
  pack_transposed<T>(a.k, a.k_stride, b, h, Nk, Dk, Nkp, w.tmp, w.kt);
  pack_rows<T>(a.k, a.k_stride, b, h, Nk, Dk, Dkp, a.scale, w.ks);
  pack_transposed<T>(a.v, a.v_stride, b, h, Nk, Dv, Nkp, w.tmp, w.vt);
  std::fill(w.dk, w.dk + Nk * Dkp, 0.0f);
  std::fill(w.dv, w.dv + Nk * Dvp, 0.0f);
  for (int64_t i0 = 0; i0 < a.Nq; i0 += QB)
    backward_rows<T>(a, b, h, i0, std::min(QB, a.Nq - i0), w);
  for (int64_t j = 0; j < Nk; ++j) {
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
  AlignedBuffer mem(w.carve(nullptr, a, QB));
  w.carve(mem.data(), a, QB);

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
