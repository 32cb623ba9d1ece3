// One small SIMD vocabulary for the CPU kernels, in three flavours selected by the ISA file:
//   FVK_SIMD_AVX512  16 x fp32 (__m512), needs avx512f/bw/vl/dq + fma
//   FVK_SIMD_AVX2     8 x fp32 (__m256), needs avx2 + fma + f16c
//   FVK_SIMD_SCALAR   1 x fp32, plain C++ (any CPU)
//
// This header is op-independent and deliberately includes nothing: an ISA translation unit
// (isa/avx512.cpp, ...) includes <immintrin.h> and every std header first, then opens
// `#pragma GCC target(...)` and an ISA-specific namespace, and only then includes this file. Every
// function here therefore gets that ISA's code generation and a name private to that ISA, so the
// linker can never pick an AVX-512 copy of an inline function for the scalar path (ODR).
//
// Conventions: vmax(a, b) / vmin(a, b) return b when either input is NaN (x86 semantics), so
// callers put the constant first and the data second to let NaN propagate.

// ---------------------------------------------------------------------------------------------
// Scalar conversions (used by every flavour for strided gathers and vector tails)
// ---------------------------------------------------------------------------------------------

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {                                                            // zero / subnormal
    const float m = static_cast<float>(mant) * 5.9604644775390625e-8f;       // mant * 2^-24
    return sign ? -m : m;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to inf, NaN stays a (quiet) NaN.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (inf included)
  if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal, round(|f| * 2^24). Adding 0.5f puts the 2^-24 place at the
    // last mantissa bit, so the FPU's own round-to-nearest-even does the rounding.
    const uint32_t r = f32_bits(bits_f32(a) + 0.5f) - f32_bits(0.5f);
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t r = a - 0x38000000u + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

// ---------------------------------------------------------------------------------------------
// Vector type and primitives
// ---------------------------------------------------------------------------------------------

#if defined(FVK_SIMD_AVX512)

constexpr int kW = 16;
// Register tile limits of the GEMM micro-kernel: 32 zmm = accumulators + kMaxNV loads + 1.
constexpr int kMaxMR = 8, kMaxNV = 4, kMaxAcc = 24;
using vf = __m512;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vsel_lt(vf x, vf y, vf a, vf b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, _CMP_LT_OQ), b, a);
}
inline vf vsel_gt(vf x, vf y, vf a, vf b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, _CMP_GT_OQ), b, a);
}
inline float vhsum(vf x) { return _mm512_reduce_add_ps(x); }
inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)), for finite x > 0.
inline void vsplit_exponent(vf x, vf* m, vf* e) {
  const vf m1 = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(m1, _mm512_set1_ps(1.41421356f), _CMP_GE_OQ);
  *m = _mm512_mask_mul_ps(m1, big, m1, _mm512_set1_ps(0.5f));
  *e = _mm512_mask_add_ps(_mm512_getexp_ps(x), big, _mm512_getexp_ps(x), _mm512_set1_ps(1.0f));
}
// x < lo ? 0 : p * 2^n (n integral); vscalefps also handles the whole exponent range.
inline vf vscale_pow2_or_zero(vf p, vf n, vf x, vf lo) {
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), p, n);
}

inline vf vload_bf16(const uint16_t* p) {
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
inline void vstore_bf16(uint16_t* p, vf x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline vf vload_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vstore_f16(uint16_t* p, vf x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Lane l of vpermute(x, idx) is lane idx[l] of x, of vgather(base, idx) is base[idx[l]];
// vall_le: every lane <= bound (NaN lanes fail).
using vindex = __m512i;
inline vindex vload_index(const int32_t* p) { return _mm512_loadu_si512(p); }
inline vf vpermute(vf x, vindex idx) { return _mm512_permutexvar_ps(idx, x); }
inline vf vgather(const float* base, vindex idx) { return _mm512_i32gather_ps(idx, base, 4); }
inline bool vall_le(vf x, float bound) {
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_LE_OQ) == 0xffff;
}

// dst[c * ldd + r] = row(r)[c] for a 16 x 16 block: pairs, quads, then 128-bit lanes.
// transpose_block: row r at src + r * lds.
template <class Row>
inline void transpose_rows(Row&& row, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(row(i));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g .. 4g + 3.
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xee);
    r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xee);
  }
  // Column 4L + c = lane L of r[c], r[4 + c], r[8 + c], r[12 + c]: a 4 x 4 transpose of lanes.
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    _mm512_storeu_ps(dst + (0 + c) * ldd, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(v0, v2, 0xdd));
    _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(v1, v3, 0xdd));
  }
}

inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_rows([&](int i) { return src + i * lds; }, dst, ldd);
}

#elif defined(FVK_SIMD_AVX2)

constexpr int kW = 8;
// 16 ymm = accumulators + kMaxNV loads + 1 broadcast.
constexpr int kMaxMR = 8, kMaxNV = 3, kMaxAcc = 12;
using vf = __m256;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vsel_lt(vf x, vf y, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, y, _CMP_LT_OQ)); }
inline vf vsel_gt(vf x, vf y, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, y, _CMP_GT_OQ)); }
inline float vhsum(vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(vf x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)), for finite normal x > 0.
inline void vsplit_exponent(vf x, vf* m, vf* e) {
  const __m256i u = _mm256_castps_si256(x);
  const vf e1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(127)));
  const vf m1 = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffff)),
                                                    _mm256_set1_epi32(0x3f800000)));
  const vf big = _mm256_cmp_ps(m1, _mm256_set1_ps(1.41421356f), _CMP_GE_OQ);
  *m = _mm256_blendv_ps(m1, _mm256_mul_ps(m1, _mm256_set1_ps(0.5f)), big);
  *e = _mm256_blendv_ps(e1, _mm256_add_ps(e1, _mm256_set1_ps(1.0f)), big);
}
// x < lo ? 0 : p * 2^n for integral n in [-126, 127].
inline vf vscale_pow2_or_zero(vf p, vf n, vf x, vf lo) {
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_setzero_ps(),
                          _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}

inline vf vload_bf16(const uint16_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline void vstore_bf16(uint16_t* p, vf x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7fff));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  // Values are < 2^16, so the unsigned-saturating pack is exact.
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline vf vload_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void vstore_f16(uint16_t* p, vf x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Lane l of vpermute(x, idx) is lane idx[l] of x, of vgather(base, idx) is base[idx[l]];
// vall_le: every lane <= bound (NaN lanes fail).
using vindex = __m256i;
inline vindex vload_index(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vf vpermute(vf x, vindex idx) { return _mm256_permutevar8x32_ps(x, idx); }
inline vf vgather(const float* base, vindex idx) { return _mm256_i32gather_ps(base, idx, 4); }
inline bool vall_le(vf x, float bound) {
  return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(bound), _CMP_LE_OQ)) == 0xff;
}

// dst[c * ldd + r] = row(r)[c] for an 8 x 8 block: pairs, quads, then 128-bit lanes.
// transpose_block: row r at src + r * lds.
template <class Row>
inline void transpose_rows(Row&& row, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(row(i));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g .. 4g + 3.
  for (int g = 0; g < 8; g += 4) {
    r[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xee);
    r[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}

inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_rows([&](int i) { return src + i * lds; }, dst, ldd);
}

#elif defined(FVK_SIMD_SCALAR)

constexpr int kW = 1;
constexpr int kMaxMR = 4, kMaxNV = 4, kMaxAcc = 12;
using vf = float;

inline vf vzero() { return 0.0f; }
inline vf vset1(float x) { return x; }
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf x) { *p = x; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
// Not std::fma: without hardware FMA that is a slow library call.
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // b when either is NaN, like maxps
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vsel_lt(vf x, vf y, vf a, vf b) { return x < y ? a : b; }
inline vf vsel_gt(vf x, vf y, vf a, vf b) { return x > y ? a : b; }
inline float vhsum(vf x) { return x; }
inline float vhmax(vf x) { return x; }
// Round to nearest even with the 1.5 * 2^23 trick (valid for |x| < 2^22 in the default rounding
// mode; the compiler keeps both operations since we never build with -ffast-math).
inline vf vround(vf x) { return (x + 12582912.0f) - 12582912.0f; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline void vsplit_exponent(vf x, vf* m, vf* e) {
  int ex = 0;
  float mm = std::frexp(x, &ex);  // [0.5, 1)
  if (mm < 0.70710678f) {
    mm *= 2.0f;
    ex -= 1;
  }
  *m = mm;
  *e = static_cast<float>(ex);
}
inline vf vscale_pow2_or_zero(vf p, vf n, vf x, vf lo) {
  if (x < lo) return 0.0f;
  if (!(n == n)) return n;  // NaN: converting it to int would be undefined
  return p * bits_f32(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

inline vf vload_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
inline void vstore_bf16(uint16_t* p, vf x) { *p = f32_to_bf16(x); }
inline vf vload_f16(const uint16_t* p) { return f16_to_f32(*p); }
inline void vstore_f16(uint16_t* p, vf x) { *p = f32_to_f16(x); }

// One lane: the only index is 0, so a permutation is the identity.
using vindex = int32_t;
inline vindex vload_index(const int32_t* p) { return *p; }
inline vf vpermute(vf x, vindex) { return x; }
inline vf vgather(const float* base, vindex idx) { return base[idx]; }
inline bool vall_le(vf x, float bound) { return x <= bound; }  // false for NaN

inline void transpose_block(const float* src, int64_t, float* dst, int64_t) { *dst = *src; }
template <class Row>
inline void transpose_rows(Row&& row, float* dst, int64_t) { *dst = *row(0); }

#else
#error "define one of FVK_SIMD_AVX512, FVK_SIMD_AVX2, FVK_SIMD_SCALAR before including simd.h"
#endif

// Hint that the cache line holding p is read soon (into L1).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// ---------------------------------------------------------------------------------------------
// Math built from the primitives (same code for every flavour)
// ---------------------------------------------------------------------------------------------

// exp(x) for fp32, within ~2 ulp: exp(x) = 2^n * exp(r) with n = round(x / ln2) and
// |r| <= ln2 / 2, where a degree-6 polynomial (our own minimax fit, relative error 2e-9 in exact
// arithmetic, ~1 ulp evaluated in fp32) approximates exp(r). Inputs below -87.33 (results under
// FLT_MIN, and -inf) give exactly 0, so masked scores contribute nothing and no denormal ever
// reaches the GEMMs; inputs above 88.37 are clamped (softmax only feeds x <= 0). NaN in, NaN out.
inline vf vexp(vf x) {
  const vf lo = vset1(-87.33654f);
  const vf xc = vmax(lo, vmin(vset1(88.37626f), x));
  const vf n = vround(vmul(xc, vset1(1.44269504088896341f)));
  // r = x - n * ln2, with ln2 split so that n * ln2_hi is exact (Cody-Waite).
  vf r = vfma(n, vset1(-0.693359375f), xc);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.3836845755577087e-3f);
  p = vfma(p, r, vset1(8.374815806746483e-3f));
  p = vfma(p, r, vset1(4.166822507977486e-2f));
  p = vfma(p, r, vset1(1.666641980409622e-1f));
  p = vfma(p, r, vset1(4.999999105930328e-1f));
  p = vfma(p, r, vset1(1.0f));
  p = vfma(p, r, vset1(1.0f));
  return vscale_pow2_or_zero(p, n, x, lo);
}

// log(x) for x >= FLT_MIN (softmax sums are >= 1), within ~1 ulp: log(m * 2^e) = e ln2 + log(m),
// log(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, summed to s^9. inf / NaN pass.
inline vf vlog(vf x) {
  vf m, e;
  vsplit_exponent(x, &m, &e);
  const vf s = vdiv(vsub(m, vset1(1.0f)), vadd(m, vset1(1.0f)));
  const vf s2 = vmul(s, s);
  vf p = vset1(1.0f / 9.0f);
  p = vfma(p, s2, vset1(1.0f / 7.0f));
  p = vfma(p, s2, vset1(1.0f / 5.0f));
  p = vfma(p, s2, vset1(1.0f / 3.0f));
  const vf two_s = vadd(s, s);
  const vf log_m = vfma(vmul(two_s, s2), p, two_s);
  const vf r = vfma(e, vset1(0.693147180559945f), log_m);
  return vsel_lt(x, vset1(3.4028235e38f), r, x);  // inf and NaN: x itself
}

// hardswish(x) = x * relu6(x + 3) / 6.
inline vf vhardswish(vf x) {
  const vf t = vmax(vzero(), vmin(vset1(6.0f), vadd(x, vset1(3.0f))));
  return vmul(vmul(x, t), vset1(1.0f / 6.0f));
}

// d hardswish / dx as PyTorch: 0 below -3, 1 above 3, x / 3 + 1/2 between.
inline vf vhardswish_grad(vf x) {
  const vf mid = vfma(x, vset1(1.0f / 3.0f), vset1(0.5f));
  return vsel_lt(x, vset1(-3.0f), vzero(), vsel_gt(x, vset1(3.0f), vset1(1.0f), mid));
}

// silu(x) = x * sigmoid(x), as PyTorch computes it: x / (1 + exp(-x)), with vexp (~2 ulp), so
// within a few ulp for x >= -88.37. Below that vexp clamps exp(-x) to ~2^127.5 and the result is
// x * ~4e-39 instead of a smaller denormal or 0: off by less than 5e-39 * abs(x). NaN passes.
inline vf vsilu(vf x) {
  return vdiv(x, vadd(vset1(1.0f), vexp(vsub(vzero(), x))));
}

// d silu / dx = s * (1 + x * (1 - s)), s = sigmoid(x) = 1 / (1 + e), e = exp(-x). 1 - s is taken
// as e * s, which does not cancel where s rounds to 1 (large x).
inline vf vsilu_grad(vf x) {
  const vf one = vset1(1.0f);
  const vf e = vexp(vsub(vzero(), x));
  const vf s = vdiv(one, vadd(one, e));
  return vmul(s, vfma(x, vmul(e, s), one));
}
