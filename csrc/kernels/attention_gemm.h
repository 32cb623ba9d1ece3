// Pieces shared by the attention kernels (kernels/{bias,policy,varlen}_attention.h): scratch
// allocation, operand packing into fp32 and the register-blocked GEMM micro-kernel. Like
// kernel_common.h it is included inside an ISA namespace by isa/kernels.inc, after simd.h and
// kernel_common.h (see simd.h for why nothing is included here), so each ISA gets its own copy.
//
// Every product goes through product<T>(): C = A * B (+ C0) with A read element-wise through two
// strides (so A^T costs nothing) and B / C as rows of whole vectors. Operands are packed into fp32
// scratch first, which converts bf16 / fp16 once and makes any input strides free. The packers take
// the operand's rows through a functor `row(j)` -> element offset of row j, plus the element stride
// `cs` along a row, so each op keeps its own layout ([B, H, N, D], [T, H, D], permuted rows).
//
// product<T>() is gemm() (fp32 FMA) everywhere but on the amx level (isa/amx.cpp), where bf16
// inputs multiply in bf16 with fp32 accumulation on the AMX tiles (kernels/bf16_gemm.h) when the
// product is large enough to pay for them.
// There a B operand packed once per (batch, head) also gets a bf16 "twin" (make_twin), and the
// kernels keep q and k unscaled (exact in bf16) and apply the scale to fp32 results instead
// (ScalePlacement), so the only bf16 roundings are of computed operands (P, dS, dO').
#pragma once

static_assert(kMaxMR <= 8 && kMaxNV <= 4, "gemm_tile dispatch covers MR <= 8, NV <= 4");

// ---------------------------------------------------------------------------------------------
// Scratch memory and operand packing
// ---------------------------------------------------------------------------------------------

// One 64-byte aligned fp32 allocation per kernel call (per thread), from PyTorch's CPU allocator
// (scratch_allocate, isa/kernel_table.h).
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t floats, bool zeroed = false) {
    const int64_t n = round_up(std::max<int64_t>(floats, 16), 16);
    data_ = static_cast<float*>(scratch_allocate(static_cast<size_t>(n) * sizeof(float), &owner_));
    if (zeroed) std::memset(data_, 0, static_cast<size_t>(n) * sizeof(float));
  }
  ~AlignedBuffer() { scratch_free(owner_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  void* owner_ = nullptr;
};

// dst[d] = mul * src[off + d * stride] for d < n, converted to fp32.
// (GCC 12 inlines it where it cannot bound n and warns that a huge iteration count would overflow
// d * stride: n is a head width, bounded by each op's limit.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
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
#pragma GCC diagnostic pop

// Element offset of x[b, h, n, 0] for a [B, H, N, D] tensor with element strides s.
inline int64_t offset4(const int64_t* s, int64_t b, int64_t h, int64_t n) {
  return b * s[0] + h * s[1] + n * s[2];
}

// dst[j * ld + d] = mul * x[row(j) + d * cs] for j < N, d < D; columns [D, ld) and rows
// [N, rows) zeroed.
template <ElemType T, class Row>
inline void pack_rows_by(const void* x, const Row& row, int64_t cs, int64_t N, int64_t rows,
                         int64_t D, int64_t ld, float mul, float* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    float* r = dst + j * ld;
    int64_t d = 0;
    if (j < N) {
      load_row<T>(x, row(j), cs, D, mul, r);
      d = D;
    }
    for (; d < ld; ++d) r[d] = 0.0f;
  }
}

// dst[d * ld + j] = x[row(j) + d * cs] for j < N, d < D, zero for j in [N, ld) and for the
// padding rows d in [D, round_up(D, kW)) that dst must also hold. Rows go kW at a time through
// `blk` (kW * round_up(D, kW) floats) and are transposed in registers.
template <ElemType T, class Row>
inline void pack_transposed_by(const void* x, const Row& row, int64_t cs, int64_t N, int64_t D,
                               int64_t ld, float* blk, float* dst) {
  const int64_t Dp = round_up(D, kW);
  for (int64_t j0 = 0; j0 < ld; j0 += kW) {
    for (int64_t r = 0; r < kW; ++r) {
      float* br = blk + r * Dp;
      int64_t d = 0;
      if (j0 + r < N) {
        load_row<T>(x, row(j0 + r), cs, D, 1.0f, br);
        d = D;
      }
      for (; d < Dp; ++d) br[d] = 0.0f;
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += kW) transpose_block(blk + d0, Dp, dst + d0 * ld + j0, ld);
  }
}

// Prefetch rows [0, N) (D elements each) for the next task, so its packing finds them in cache:
// per-head rows of a fused qkv buffer are scattered and the hardware prefetchers miss them
// (measured ~15% at LeViT batch 64).
template <ElemType T, class Row>
inline void prefetch_rows_by(const void* x, const Row& row, int64_t cs, int64_t N, int64_t D) {
  const int64_t esize = sizeof(typename Elem<T>::type);
  const char* base = static_cast<const char*>(x);
  for (int64_t r = 0; r < N; ++r) {
    const char* p = base + row(r) * esize;
    for (int64_t d = 0; d < D; d += 64 / esize) prefetch(p + d * cs * esize);
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

// Epilogues used by more than one op (op-specific ones live with their op).
struct StoreEpi {  // C = acc
  float* c; int64_t ldc;
  void operator()(int64_t i, int64_t jv, vf x) { vstore(c + i * ldc + jv * kW, x); }
};
struct ScaleStoreEpi {  // C = acc * mul
  float* c; int64_t ldc; float mul;
  void operator()(int64_t i, int64_t jv, vf x) { vstore(c + i * ldc + jv * kW, vmul(x, vset1(mul))); }
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
// product<T>(): gemm(), or bf16 products where this ISA has them for T
// ---------------------------------------------------------------------------------------------

#if defined(FVK_BF16_PRODUCTS)
#include "kernels/bf16_gemm.h"
// Only bf16: fp16 has no bf16-width product with fp32 accumulation short of AMX-FP16, which the
// amx level does not require (and fp32 / fp16 inputs run the avx512 kernels there anyway).
template <ElemType T>
constexpr bool kBf16Products = T == ElemType::kBFloat16;
#else
template <ElemType T>
constexpr bool kBf16Products = false;
#endif

// C (M rows x NVt vectors) = A (M x K, strides ars / acs) * B (K rows of ldb floats) (+ C0), the
// epilogue receiving each finished accumulator vector. B16: B's twin (make_twin) or null.
template <ElemType T, class Epi>
inline void product(int64_t M, int64_t NVt, int64_t K, const float* A, int64_t ars, int64_t acs,
                    const float* B, int64_t ldb, const uint32_t* B16, const float* C0,
                    int64_t ldc0, Epi& epi) {
#if defined(FVK_BF16_PRODUCTS)
  if constexpr (kBf16Products<T>) {
    if (tiles_pay(NVt, K)) {
      gemm_bf16(M, NVt, K, A, ars, acs, B, ldb, B16, C0, ldc0, epi);
      return;
    }
  }
#endif
  {
    (void)B16;
    gemm(M, NVt, K, A, ars, acs, B, ldb, C0, ldc0, epi);
  }
}

// Query rows a forward handles together: their scores stay in L1 between the two products. With
// bf16 products, two tile rows (2 x 2 tile blocks, whose four accumulators keep the tile unit busy).
template <ElemType T>
constexpr int64_t kRowGroup = kBf16Products<T> ? 32 : kW == 1 ? 8 : 2 * kMaxMR;
static_assert(kRowGroup<ElemType::kBFloat16> % kW == 0, "row statistics go in whole vectors");

// The bf16 twin of a B operand (K rows of ld floats): scratch for it (null when T's products are
// fp32), and its conversion, done once after each packing of B.
template <ElemType T>
inline uint32_t* take_twin(Carver& c, int64_t K, int64_t ld) {
#if defined(FVK_BF16_PRODUCTS)
  if constexpr (kBf16Products<T>) return reinterpret_cast<uint32_t*>(c.take(vnni_words(K, ld)));
#endif
  (void)c, (void)K, (void)ld;
  return nullptr;
}

// (Skipped when even a product over all ld columns would stay on gemm(): then none reads it.)
template <ElemType T>
inline void make_twin(const float* B, int64_t ld, int64_t K, uint32_t* twin) {
#if defined(FVK_BF16_PRODUCTS)
  if constexpr (kBf16Products<T>)
    if (tiles_pay(ld / kW, K)) pack_vnni(B, ld, K, ld, ld, ld, twin);
#endif
  (void)B, (void)ld, (void)K, (void)twin;
}

// Where the softmax scale goes: into the packed q / k (fp32 products: as today), or, with bf16
// products, onto the fp32 scores and the fp32 dq / dk (q and k then enter the products exactly).
// Multiplying by the other factor, 1, changes no bit.
struct ScalePlacement {
  float operand;  // q / k packed times this
  float result;   // scores, dq, dk times this
};
template <ElemType T>
inline ScalePlacement scale_placement(float scale) {
  if constexpr (kBf16Products<T>) return {1.0f, scale};
  return {scale, 1.0f};
}

// x[0, n) *= mul (n a whole number of vectors); nothing when mul is 1.
inline void scale_rows(float* x, int64_t n, float mul) {
  if (mul == 1.0f) return;
  const vf m = vset1(mul);
  for (int64_t i = 0; i < n; i += kW) vstore(x + i, vmul(vload(x + i), m));
}

// ---------------------------------------------------------------------------------------------
// Softmax of a group of score rows (bias and varlen forward)
// ---------------------------------------------------------------------------------------------

// lse = max + log(sum) and row_sum = 1 / sum from the row maxima and sums of `rows` rows, a vector
// of rows at once over all `group` entries (a whole number of vectors; rows past `rows` get 1).
inline void finish_softmax_stats(int64_t rows, int64_t group, float* lse, float* row_sum) {
  for (int64_t r = rows; r < group; ++r) lse[r] = row_sum[r] = 1.0f;
  for (int64_t r = 0; r < group; r += kW) {
    const vf l = vload(row_sum + r);
    vstore(lse + r, vadd(vload(lse + r), vlog(l)));
    vstore(row_sum + r, vdiv(vset1(1.0f), l));
  }
}

// Softmax numerators of `rows` rows of s (ld floats, whole vectors, padding already -inf) in
// place; then lse = max + log(sum) and row_sum = 1 / sum, a vector of rows at once over all
// `group` entries (a whole number of vectors; rows past `rows` are filled with 1).
inline void softmax_rows(float* s, int64_t rows, int64_t ld, int64_t group, float* lse,
                         float* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * ld;
    vf mx = vload(sr);
    for (int64_t c = kW; c < ld; c += kW) mx = vmax(mx, vload(sr + c));
    const float m = vhmax(mx);
    const vf mv = vset1(m);
    vf sum = vzero();
    for (int64_t c = 0; c < ld; c += kW) {
      const vf e = vexp(vsub(vload(sr + c), mv));
      vstore(sr + c, e);
      sum = vadd(sum, e);
    }
    lse[r] = m;
    row_sum[r] = vhsum(sum);
  }
  finish_softmax_stats(rows, group, lse, row_sum);
}

#if defined(FVK_BF16_PRODUCTS)
// 2^t for the softmax numerators that are rounded to bf16 next (t = (s - max) / ln2 <= ~0):
// 2^t = 2^n * 2^f, n = round(t), |f| <= 1/2, with a degree-4 polynomial for 2^f (our own
// relative-error fit: 2.7e-6 evaluated in fp32, ~1/1400 of bf16's rounding step, where vexp's
// degree 6 gives ~1 ulp). Below t = -125 the result is exactly 0, masked rather than computed:
// results in the denormal range cost a microcode assist each (and would reach the products); -inf
// gives 0, NaN passes (vmax returns its second operand, the compare is unordered-true).
inline vf vexp2_for_bf16(vf t) {
  t = vmax(vset1(-126.0f), t);
  const __mmask16 normal = _mm512_cmp_ps_mask(t, vset1(-125.0f), _CMP_NLT_UQ);
  const vf n = vround(t);
  const vf f = vsub(t, n);
  vf p = vset1(9.570100344717503e-3f);
  p = vfma(p, f, vset1(5.591786280274391e-2f));
  p = vfma(p, f, vset1(2.40247443318367e-1f));
  p = vfma(p, f, vset1(6.931217908859253e-1f));
  p = vfma(p, f, vset1(9.999992847442627e-1f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// The bf16 flavour for a P v product on the tiles: the numerators exp(s - row_max) of `rows` score
// rows (ld floats, whole vectors, padding -inf) go straight into p16 as bf16 A rows of
// k_padded(K) (K <= ld: the keys; rows up to round_up(rows, 16) zero), skipping softmax_rows'
// fp32 store and gemm_bf16's repacking of it. The numerators come from vexp2_for_bf16 (the
// exponential is most of this pass, and bf16 keeps 8 bits of it); their fp32 sums and the rounding
// to bf16 are as softmax_rows followed by pack_a_rows. lse[r] holds row r's maximum on entry, then
// as softmax_rows.
inline void softmax_rows_bf16(const float* s, int64_t rows, int64_t ld, int64_t K, int64_t group,
                              float* lse, float* row_sum, uint16_t* p16) {
  constexpr float kLog2e = 1.44269504088896341f;
  const int64_t Kp = k_padded(K);
  const vf log2e = vset1(kLog2e);
  for (int64_t r = 0; r < rows; ++r) {
    const float* sr = s + r * ld;
    uint16_t* pr = p16 + r * Kp;
    const vf shift = vset1(-lse[r] * kLog2e);  // t = s log2(e) - max log2(e), one FMA
    vf sum = vzero();
    // c < ld always (Kp <= ld + kW, c a multiple of 2 kW); c + kW reaches past ld at most once.
    for (int64_t c = 0; c < Kp; c += 2 * kW) {
      const vf lo = vexp2_for_bf16(vfma(vload(sr + c), log2e, shift));
      const vf hi = c + kW < ld ? vexp2_for_bf16(vfma(vload(sr + c + kW), log2e, shift)) : vzero();
      sum = vadd(vadd(sum, lo), hi);
      _mm512_storeu_si512(pr + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    row_sum[r] = vhsum(sum);
  }
  const int64_t padded_rows = round_up(rows, kTileRows);
  if (padded_rows > rows)
    std::memset(p16 + rows * Kp, 0, static_cast<size_t>((padded_rows - rows) * Kp) * sizeof(uint16_t));
  finish_softmax_stats(rows, group, lse, row_sum);
}
#endif
