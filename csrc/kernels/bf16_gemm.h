// bf16 products with fp32 accumulation for the attention kernels, behind gemm_bf16(), which takes
// the same operands as attention_gemm.h's gemm() (A as fp32 through two strides, B as fp32 rows)
// plus an optional B already in the bf16 layout (a "twin", converted once per pack), and
// tiles_product(), which multiplies operands packed by the caller. attention_gemm.h's product() is
// how the kernels reach it, and it keeps small products on gemm() (tiles_pay()). Two levels compile
// it (FVK_BF16_PRODUCTS, inside their ISA namespace and target region, after simd.h's AVX-512
// flavour), with the same operand layouts and two micro-kernels:
//   - isa/amx.cpp (FVK_BF16_TILES): the AMX tiles (tdpbf16ps), Sapphire Rapids and later;
//   - isa/avx512bf16.cpp: vdpbf16ps on AVX-512 registers, for CPUs with AVX512-BF16 and no AMX
//     (AMD Zen 4, Intel Cooper Lake). Each instruction does two multiply-adds per fp32 lane, twice
//     an FMA's (docs/bias_attention.md, "CPU ISA levels").
//
// Layouts (bf16 values held as uint16_t, fp32 rounded to nearest even by vcvtne2ps2bf16):
//   A (M x K): bf16 rows of Kp = round_up(K, 32) (zero from K on), Mp = round_up(M, 16) rows (rows
//       from M on zero). A[m][2r], A[m][2r + 1] form one 32-bit word.
//   B (K x N, N whole vectors): the "VNNI" layout that tdpbf16ps and vdpbf16ps both read: Kp / 2
//       rows of ld 32-bit words, word (r, n) = B[2r][n] | B[2r + 1][n] << 16, zero from K on.
// Every AMX tile is 16 rows x 64 bytes: an A tile is 16 rows x 32 bf16 of K, a B tile 16 word rows
// (32 of K) x 16 columns, a C tile 16 x 16 fp32. Padding K to 32 costs the tile unit nothing
// (tdpbf16ps takes as long for 16 of K as for 32) and keeps one tile configuration for all; the
// vdpbf16ps kernel stops at K's last word instead.
//
// Why the amx level has no vdpbf16ps path for small products: on Sapphire Rapids vdpbf16ps retires
// half as many products per cycle as the fp32 FMAs (measured: 35-40 vs 64-80 multiply-adds per ns
// on one core), so products too small for the tiles are cheapest on gemm() itself.
//
// Tile state is per thread: MatrixUnitScope loads the configuration in each worker at the start of
// a kernel call and releases it at the end (isa/amx.cpp's entry points), and the OS must have
// granted the process the tile data first (isa/isa.cpp asks, once, before the amx level is used).
#pragma once

static_assert(kW == 16, "the bf16 products use the AVX-512 flavour of simd.h");

constexpr int64_t kTileRows = 16;  // rows of an A / C tile, word rows of a B tile
constexpr int64_t kTileK = 32;     // bf16 of K in one A tile row (64 bytes)

inline int64_t k_padded(int64_t K) { return round_up(K, kTileK); }

// 32-bit words of a K-row B operand with leading dimension ld in the VNNI layout.
inline int64_t vnni_words(int64_t K, int64_t ld) { return k_padded(K) / 2 * ld; }

#if defined(FVK_BF16_TILES)
// ---------------------------------------------------------------------------------------------
// Per-thread state: the tile configuration (amx level)
// ---------------------------------------------------------------------------------------------

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// Palette 1, tiles 0-7 all 16 x 64 bytes: C = 0-3, A = 4-5, B = 6-7 (see tile_block).
constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64},
                                    {16, 16, 16, 16, 16, 16, 16, 16}};

// The tile configuration of this thread for one kernel call.
class MatrixUnitScope {
 public:
  MatrixUnitScope() { _tile_loadconfig(&kTileConfig); }
  ~MatrixUnitScope() { _tile_release(); }
  MatrixUnitScope(const MatrixUnitScope&) = delete;
  MatrixUnitScope& operator=(const MatrixUnitScope&) = delete;
};
#endif

// ---------------------------------------------------------------------------------------------
// Per-thread conversion buffers
// ---------------------------------------------------------------------------------------------

// A 64-byte aligned buffer that only grows (kept per thread between calls: the operands of one
// product, a few tens of KiB at attention sizes).
class GrowBuffer {
 public:
  ~GrowBuffer() { std::free(data_); }
  template <class U>
  U* get(int64_t count) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(U);
    if (bytes > size_) {
      std::free(data_);
      size_ = 0;
      const size_t n = (bytes + 4095) / 4096 * 4096;
      data_ = std::aligned_alloc(64, n);
      if (data_ == nullptr) throw std::bad_alloc();
      size_ = n;
    }
    return static_cast<U*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct Bf16Buffers {
  GrowBuffer a, b, t;
};
thread_local Bf16Buffers t_bf16_buffers;

// ---------------------------------------------------------------------------------------------
// fp32 -> bf16 operand packing
// ---------------------------------------------------------------------------------------------

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}
inline __mmask32 pair_mask(int64_t n) {  // the first n of 32 16-bit lanes
  return n >= 32 ? static_cast<__mmask32>(0xffffffffu)
                 : n <= 0 ? static_cast<__mmask32>(0) : static_cast<__mmask32>((1u << n) - 1u);
}

// Lane order that turns [lo_0 .. lo_15, hi_0 .. hi_15] into [lo_0, hi_0, lo_1, hi_1, ...].
inline __m512i pair_order() {
  alignas(64) static constexpr uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                    21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                                    11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(kIdx);
}

// 16 words bf16(lo[n]) | bf16(hi[n]) << 16.
inline __m512i bf16_pairs(__m512 lo, __m512 hi, __m512i order) {
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// dst = rows [0, K) of X (row stride ldx, `cols` valid floats per row, read as N = whole vectors
// with the rest zero) in the VNNI layout with leading dimension ld >= N.
inline void pack_vnni(const float* X, int64_t ldx, int64_t K, int64_t cols, int64_t N, int64_t ld,
                      uint32_t* dst) {
  const __m512i order = pair_order();
  const int64_t K2 = k_padded(K) / 2;
  for (int64_t r = 0; r < K2; ++r) {
    const int64_t k = 2 * r;
    uint32_t* d = dst + r * ld;
    if (k >= K) {
      std::memset(d, 0, static_cast<size_t>(N) * sizeof(uint32_t));
      continue;
    }
    const float* x0 = X + k * ldx;
    const float* x1 = x0 + ldx;
    const bool has1 = k + 1 < K;
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 m = tail_mask(cols - n);
      const __m512 lo = _mm512_maskz_loadu_ps(m, x0 + n);
      const __m512 hi = has1 ? _mm512_maskz_loadu_ps(m, x1 + n) : _mm512_setzero_ps();
      _mm512_storeu_si512(d + n, bf16_pairs(lo, hi, order));
    }
  }
}

// dst (A layout, Kp = k_padded(K) bf16 per row, round_up(M, 16) rows) = A[m][k] = X[m * ldx + k].
inline void pack_a_rows(const float* X, int64_t ldx, int64_t M, int64_t K, uint16_t* dst) {
  const int64_t Kp = k_padded(K), Mp = round_up(M, kTileRows);
  for (int64_t m = 0; m < Mp; ++m) {
    uint16_t* d = dst + m * Kp;
    if (m >= M) {
      std::memset(d, 0, static_cast<size_t>(Kp) * sizeof(uint16_t));
      continue;
    }
    const float* x = X + m * ldx;
    for (int64_t k = 0; k < Kp; k += 32) {
      const __m512 lo = _mm512_maskz_loadu_ps(tail_mask(K - k), x + k);
      const __m512 hi = _mm512_maskz_loadu_ps(tail_mask(K - k - 16), x + k + 16);
      _mm512_storeu_si512(d + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// The same for A = X^T, A[m][k] = X[k * ldx + m]: the VNNI layout of X (pairs of its rows are
// pairs along A's k) into tmp, then 16 x 16 word transposes.
inline void pack_a_transposed(const float* X, int64_t ldx, int64_t M, int64_t K, uint32_t* tmp,
                              uint16_t* dst) {
  const int64_t K2 = k_padded(K) / 2, Mp = round_up(M, kTileRows);
  pack_vnni(X, ldx, K, M, Mp, Mp, tmp);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);  // K2 words per row
  for (int64_t r = 0; r < K2; r += 16)
    for (int64_t m = 0; m < Mp; m += 16)
      transpose_block(reinterpret_cast<const float*>(tmp + r * Mp + m), Mp,
                      reinterpret_cast<float*>(d + m * K2 + r), K2);
}

// The same layouts packed straight from bf16 rows (row(n): a uint16_t pointer to row n, elements
// contiguous), for inputs that are bf16 already: no fp32 round trip, the same bits.

// dst (A layout) = X [M rows of K bf16].
template <class Row>
inline void pack_a_rows_bf16(Row&& row, int64_t M, int64_t K, uint16_t* dst) {
  const int64_t Kp = k_padded(K), Mp = round_up(M, kTileRows);
  for (int64_t m = 0; m < Mp; ++m) {
    uint16_t* d = dst + m * Kp;
    for (int64_t k = 0; k < Kp; k += 32) {
      const __m512i x = m < M ? _mm512_maskz_loadu_epi16(pair_mask(K - k), row(m) + k)
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(d + k, x);
    }
  }
}

// dst (VNNI, K = N rows, ld words per row) = X [N rows of D bf16]: word (r, c) = X[2r][c] |
// X[2r + 1][c] << 16, zero from column D and row N on.
template <class Row>
inline void pack_vnni_rows_bf16(Row&& row, int64_t N, int64_t D, int64_t ld, uint32_t* dst) {
  const __m512i order = pair_order();
  const int64_t K2 = k_padded(N) / 2;
  for (int64_t r = 0; r < K2; ++r) {
    uint32_t* d = dst + r * ld;
    const int64_t k = 2 * r;
    if (k >= N) {
      std::memset(d, 0, static_cast<size_t>(ld) * sizeof(uint32_t));
      continue;
    }
    const uint16_t* x0 = row(k);
    const uint16_t* x1 = k + 1 < N ? row(k + 1) : nullptr;
    for (int64_t c = 0; c < ld; c += 16) {
      const __mmask16 m = tail_mask(D - c);
      const __m256i lo = _mm256_maskz_loadu_epi16(m, x0 + c);
      const __m256i hi = x1 != nullptr ? _mm256_maskz_loadu_epi16(m, x1 + c) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      _mm512_storeu_si512(d + c, _mm512_permutexvar_epi16(order, both));
    }
  }
}

// dst (VNNI, K = D rows, ld >= N words per row) = X^T for X [N rows of D bf16], D even: word
// (r, n) is the r-th 32-bit word of row n (X[n][2r] | X[n][2r + 1] << 16), so this is a transpose
// of 32-bit words, in 16 x 16 blocks; zero from column N and row D / 2 on.
template <class Row>
inline void pack_vnni_transposed_bf16(Row&& row, int64_t N, int64_t D, int64_t ld, uint32_t* dst) {
  const int64_t K2 = k_padded(D) / 2, D2 = D / 2;
  alignas(64) uint32_t blk[16 * 16];
  for (int64_t n0 = 0; n0 < ld; n0 += 16) {
    for (int64_t r0 = 0; r0 < K2; r0 += 16) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t n = n0 + i;
        const __m512i x = n < N && r0 < D2
            ? _mm512_maskz_loadu_epi32(tail_mask(D2 - r0), row(n) + 2 * r0)
            : _mm512_setzero_si512();
        _mm512_store_si512(blk + i * 16, x);
      }
      transpose_block(reinterpret_cast<const float*>(blk), 16,
                      reinterpret_cast<float*>(dst + r0 * ld + n0), ld);
    }
  }
}

#if defined(FVK_BF16_TILES)
// ---------------------------------------------------------------------------------------------
// Micro-kernels (amx level)
// ---------------------------------------------------------------------------------------------

// GCC's tile intrinsics paste the tile number into the asm text, so it must be a literal: these
// map a compile-time number onto the literal forms. C tiles are 0-3, A tiles 4-5, B tiles 5-7.
template <int t>
inline void tile_zero() {
  if constexpr (t == 0) _tile_zero(0);
  else if constexpr (t == 1) _tile_zero(1);
  else if constexpr (t == 2) _tile_zero(2);
  else _tile_zero(3);
}
template <int t>
inline void tile_store(float* p, long stride) {
  if constexpr (t == 0) _tile_stored(0, p, stride);
  else if constexpr (t == 1) _tile_stored(1, p, stride);
  else if constexpr (t == 2) _tile_stored(2, p, stride);
  else _tile_stored(3, p, stride);
}
template <int t>
inline void tile_load(const void* p, long stride) {
  if constexpr (t == 4) _tile_loadd(4, p, stride);
  else if constexpr (t == 5) _tile_loadd(5, p, stride);
  else if constexpr (t == 6) _tile_loadd(6, p, stride);
  else _tile_loadd(7, p, stride);
}
#define FVK_TILE_DP(C)                                                    \
  if constexpr (a == 4 && b == 5) _tile_dpbf16ps(C, 4, 5);                \
  else if constexpr (a == 4 && b == 6) _tile_dpbf16ps(C, 4, 6);           \
  else if constexpr (a == 4 && b == 7) _tile_dpbf16ps(C, 4, 7);           \
  else if constexpr (a == 5 && b == 6) _tile_dpbf16ps(C, 5, 6);           \
  else _tile_dpbf16ps(C, 5, 7);
template <int c, int a, int b>
inline void tile_dp() {  // C[c] += A[a] * B[b]
  if constexpr (c == 0) { FVK_TILE_DP(0) }
  else if constexpr (c == 1) { FVK_TILE_DP(1) }
  else if constexpr (c == 2) { FVK_TILE_DP(2) }
  else { FVK_TILE_DP(3) }
}
#undef FVK_TILE_DP

// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>).
template <int N, class F>
inline void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// c (MT x NT tiles of 16 x 16 fp32, ldc floats per row) = rows [0, 16 MT) of A (lda bf16 per
// row) times columns [0, 16 NT) of B (VNNI, ldb words per row), over kchunks chunks of 32 of K.
// Tiles are not renamed, so a block is a chain load -> tdpbf16ps -> store: its MT * NT <= 4
// accumulators are what keeps the tile unit busy (1 x 4 for a single row tile, else 2 x 2).
template <int MT, int NT>
inline void tile_block(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                       int64_t kchunks, float* c, int64_t ldc) {
  static_assert(MT >= 1 && MT <= 2 && NT >= 1 && MT * NT <= 4, "4 accumulator tiles");
  constexpr int kB0 = 4 + MT;  // B tiles kB0 .. 7, reused round-robin
  const long sa = static_cast<long>(lda * 2), sb = static_cast<long>(ldb * 4);
  static_for<MT * NT>([&](auto t) { tile_zero<t>(); });
  for (int64_t kc = 0; kc < kchunks; ++kc) {
    const uint16_t* ak = a + kc * kTileK;
    const uint32_t* bk = b + kc * kTileRows * ldb;
    static_for<MT>([&](auto m) { tile_load<4 + m>(ak + m * kTileRows * lda, sa); });
    static_for<NT>([&](auto n) {
      constexpr int bt = kB0 + n % (8 - kB0);
      tile_load<bt>(bk + n * 16, sb);
      static_for<MT>([&](auto m) { tile_dp<m * NT + n, 4 + m, bt>(); });
    });
  }
  static_for<MT * NT>([&](auto t) {
    tile_store<t>(c + (t / NT) * 16 * ldc + (t % NT) * 16, static_cast<long>(ldc * 4));
  });
}

// Hands a finished MT x NT tile block (rows from i0, vector columns from jv0) to the epilogue,
// with C0 added; rows from M on are padding.
template <int MT, int NT, class Epi>
inline void tile_block_epilogue(const float* c, int64_t i0, int64_t jv0, int64_t M,
                                const float* C0, int64_t ldc0, Epi& epi) {
  const int64_t rows = std::min<int64_t>(MT * kTileRows, M - i0);
  for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      vf x = vload(c + r * NT * 16 + t * 16);
      if (C0 != nullptr) x = vadd(x, vload(C0 + (i0 + r) * ldc0 + (jv0 + t) * kW));
      epi(i0 + r, jv0 + t, x);
    }
  }
}

template <int MT, int NT, class Epi>
inline void tile_block_run(const uint16_t* a16, int64_t Kp, const uint32_t* b, int64_t ldb,
                           int64_t i0, int64_t jv0, int64_t M, const float* C0, int64_t ldc0,
                           Epi& epi) {
  alignas(64) float c[MT * NT * 256];
  tile_block<MT, NT>(a16 + i0 * Kp, Kp, b + jv0 * kW, ldb, Kp / kTileK, c, NT * 16);
  tile_block_epilogue<MT, NT>(c, i0, jv0, M, C0, ldc0, epi);
}

// ---------------------------------------------------------------------------------------------
// The product
// ---------------------------------------------------------------------------------------------

// The tile blocks of the row tiles from row i (two when rows remain past i + 16, else one) over
// NVt vectors of columns: f(MT, NT, jv) per block, MT and NT as integral constants — 2 x 2 blocks
// for two row tiles, 1 x 4 for one (see tile_block), narrower at the right edge.
template <class F>
inline void for_each_tile_block(int64_t i, int64_t M, int64_t NVt, F&& f) {
  using std::integral_constant;
  if (i + kTileRows < M) {
    for (int64_t jv = 0; jv < NVt; jv += 2) {
      if (jv + 1 < NVt)
        f(integral_constant<int, 2>{}, integral_constant<int, 2>{}, jv);
      else
        f(integral_constant<int, 2>{}, integral_constant<int, 1>{}, jv);
    }
    return;
  }
  for (int64_t jv = 0; jv < NVt; jv += 4) {
    switch (std::min<int64_t>(4, NVt - jv)) {
      case 4: f(integral_constant<int, 1>{}, integral_constant<int, 4>{}, jv); break;
      case 3: f(integral_constant<int, 1>{}, integral_constant<int, 3>{}, jv); break;
      case 2: f(integral_constant<int, 1>{}, integral_constant<int, 2>{}, jv); break;
      default: f(integral_constant<int, 1>{}, integral_constant<int, 1>{}, jv); break;
    }
  }
}

// gemm_bf16's products on the packed operands: C (M rows x NVt vectors) = a16 * B16 (+ C0), each
// finished row vector to the epilogue.
template <class Epi>
inline void blocks_product(int64_t M, int64_t NVt, int64_t K, const uint16_t* a16,
                           const uint32_t* B16, int64_t ldb, const float* C0, int64_t ldc0,
                           Epi& epi) {
  const int64_t Kp = k_padded(K);
  // The tile loads are asm without a memory operand: make the packing stores land first.
  __asm__ __volatile__("" ::: "memory");
  for (int64_t i = 0; i < M; i += 2 * kTileRows)
    for_each_tile_block(i, M, NVt, [&](auto mt, auto nt, int64_t jv) {
      tile_block_run<decltype(mt)::value, decltype(nt)::value>(a16, Kp, B16, ldb, i, jv, M, C0,
                                                                ldc0, epi);
    });
}

// tiles_product for K <= 32 (one chunk: the attention scores at head widths up to 32), MT row
// tiles: A is loaded once, and the columns alternate between two sets of C tiles ({0, 1} with B
// tile 6, {2, 3} with B tile 7), so that one column's stores drain while the next one's products
// run. Tiles are not renamed: with one set, each column's zero -> product -> store chain would
// wait for the previous one, which dominates when a chain is a single product.
template <int MT>
inline void tile_columns_one_chunk(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                   int64_t NVt, float* c, int64_t ldc) {
  const long sa = static_cast<long>(lda * 2), sb = static_cast<long>(ldb * 4);
  const long sc = static_cast<long>(ldc * 4);
  static_for<MT>([&](auto m) { tile_load<4 + m>(a + m * kTileRows * lda, sa); });
  // Set S: C tiles 2S .. 2S + MT - 1 (row tile m in C tile 2S + m), B tile 6 + S.
  auto compute = [&](auto set, int64_t n) {
    constexpr int S = decltype(set)::value;
    static_for<MT>([&](auto m) { tile_zero<2 * S + m>(); });
    tile_load<6 + S>(b + n * 16, sb);
    static_for<MT>([&](auto m) { tile_dp<2 * S + m, 4 + m, 6 + S>(); });
  };
  auto store = [&](auto set, int64_t n) {
    constexpr int S = decltype(set)::value;
    static_for<MT>([&](auto m) { tile_store<2 * S + m>(c + m * kTileRows * ldc + n * 16, sc); });
  };
  using Set0 = std::integral_constant<int, 0>;
  using Set1 = std::integral_constant<int, 1>;
  compute(Set0{}, 0);
  int64_t n = 1;
  for (; n + 1 < NVt; n += 2) {
    compute(Set1{}, n);
    store(Set0{}, n - 1);
    compute(Set0{}, n + 1);
    store(Set1{}, n);
  }
  if (n < NVt) {
    compute(Set1{}, n);
    store(Set0{}, n - 1);
    store(Set1{}, n);
  } else {
    store(Set0{}, n - 1);
  }
}

// C (round_up(M, 16) rows x NVt vectors, ldc floats per row) = A16 (the A layout: M rows of
// k_padded(K) bf16, rows up to round_up(M, 16) zero) * B16 (VNNI, ldb words per row), the tiles
// stored straight into C with no epilogue: for a caller that reads C in a later pass anyway (the
// fused softmax of attention_gemm.h), which saves gemm_bf16's bounce through a stack block. Rows
// from M on are written too (zero products): C must have room for them.
inline void tiles_product(int64_t M, int64_t NVt, int64_t K, const uint16_t* a16,
                          const uint32_t* B16, int64_t ldb, float* C, int64_t ldc) {
  const int64_t Kp = k_padded(K), kchunks = Kp / kTileK;
  __asm__ __volatile__("" ::: "memory");  // the operands' packing stores land first
  for (int64_t i = 0; i < M; i += 2 * kTileRows) {
    const uint16_t* a = a16 + i * Kp;
    float* c = C + i * ldc;
    if (kchunks == 1) {
      if (i + kTileRows < M)
        tile_columns_one_chunk<2>(a, Kp, B16, ldb, NVt, c, ldc);
      else
        tile_columns_one_chunk<1>(a, Kp, B16, ldb, NVt, c, ldc);
      continue;
    }
    for_each_tile_block(i, M, NVt, [&](auto mt, auto nt, int64_t jv) {
      tile_block<decltype(mt)::value, decltype(nt)::value>(a, Kp, B16 + jv * kW, ldb, kchunks,
                                                           c + jv * kW, ldc);
    });
  }
  __asm__ __volatile__("" ::: "memory");  // and the tile stores before C is read
}

#else  // the avx512bf16 level: vdpbf16ps

// ---------------------------------------------------------------------------------------------
// Micro-kernel (avx512bf16 level)
// ---------------------------------------------------------------------------------------------

// One vdpbf16ps adds to 16 fp32 sums the products of one A word (two bf16 of K, broadcast) with 16
// B words (the same two rows of K, 16 columns). A block of kDotRows rows x NV vectors of C stays in
// registers over all of K: 16 sums, 4 B vectors and the broadcast word take 21 of the 32 registers,
// and 16 independent sums cover the instruction's latency.
constexpr int64_t kDotRows = 4;  // divides kTileRows: the packed A's rows need no remainder block
constexpr int64_t kDotVecs = 4;

inline __m512bh broadcast_word(const uint16_t* p) {  // the 32-bit word at p, in every lane
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
}

// store(m, c, sums) for rows [0, kDotRows) and vectors [0, NV) of a (lda bf16 per row) times b
// (ldb words per row) over K2 words of K.
template <int NV, class Store>
inline void dot_block(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t K2,
                      Store&& store) {
  __m512 acc[kDotRows][NV];
#pragma GCC unroll 4
  for (int m = 0; m < kDotRows; ++m)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t r = 0; r < K2; ++r) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + r * ldb + c * 16);
#pragma GCC unroll 4
    for (int m = 0; m < kDotRows; ++m) {
      const __m512bh aw = broadcast_word(a + m * lda + 2 * r);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], aw, bv[c]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < kDotRows; ++m)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) store(m, c, acc[m][c]);
}

// dot_block over rows [0, rows) (a multiple of kDotRows) and NVt vectors of columns; K's words stop
// at its last one (a word past it would only add zeros).
template <class Store>
inline void dot_blocks(int64_t rows, int64_t NVt, int64_t K, const uint16_t* a16,
                       const uint32_t* B16, int64_t ldb, Store&& store) {
  const int64_t Kp = k_padded(K), K2 = (K + 1) / 2;
  for (int64_t i = 0; i < rows; i += kDotRows) {
    const uint16_t* a = a16 + i * Kp;
    for (int64_t jv = 0; jv < NVt; jv += kDotVecs) {
      auto at = [&](int64_t m, int64_t c, __m512 x) { store(i + m, jv + c, x); };
      const uint32_t* b = B16 + jv * kW;
      switch (std::min<int64_t>(kDotVecs, NVt - jv)) {
        case 4: dot_block<4>(a, Kp, b, ldb, K2, at); break;
        case 3: dot_block<3>(a, Kp, b, ldb, K2, at); break;
        case 2: dot_block<2>(a, Kp, b, ldb, K2, at); break;
        default: dot_block<1>(a, Kp, b, ldb, K2, at); break;
      }
    }
  }
}

// gemm_bf16's products on the packed operands, as the amx level's (above).
template <class Epi>
inline void blocks_product(int64_t M, int64_t NVt, int64_t K, const uint16_t* a16,
                           const uint32_t* B16, int64_t ldb, const float* C0, int64_t ldc0,
                           Epi& epi) {
  dot_blocks(round_up(M, kDotRows), NVt, K, a16, B16, ldb, [&](int64_t i, int64_t jv, vf x) {
    if (i >= M) return;
    if (C0 != nullptr) x = vadd(x, vload(C0 + i * ldc0 + jv * kW));
    epi(i, jv, x);
  });
}

// tiles_product as the amx level's (above), rows up to round_up(M, 16) written too.
inline void tiles_product(int64_t M, int64_t NVt, int64_t K, const uint16_t* a16,
                          const uint32_t* B16, int64_t ldb, float* C, int64_t ldc) {
  dot_blocks(round_up(M, kTileRows), NVt, K, a16, B16, ldb, [&](int64_t i, int64_t jv, vf x) {
    vstore(C + i * ldc + jv * kW, x);
  });
}

#endif  // FVK_BF16_TILES

// Whether the tiles pay for a product of NVt vectors of columns and depth K. A tile block's chain
// (load -> tdpbf16ps -> store, then the epilogue's loads, which cannot forward from a tile store)
// costs a few hundred cycles that the FMA kernel does not pay, so a 16 x 16 x 16 score product runs
// faster on gemm(). Decided from the product's shape only, never from M (which follows the task
// split), so every row's result is the same for any thread count.
constexpr int64_t kTileMinWork = 128;  // NVt * K
inline bool tiles_pay(int64_t NVt, int64_t K) { return NVt * K >= kTileMinWork; }

// C (M rows x NVt vectors) = A (M x K, strides ars / acs, one of them 1) * B (K rows of ldb
// floats) (+ C0), in bf16 with fp32 accumulation; B16: B's VNNI twin (leading dimension ldb, at
// least K rows) or null to convert B here. The epilogue gets each finished row vector, like gemm().
template <class Epi>
inline void gemm_bf16(int64_t M, int64_t NVt, int64_t K, const float* A, int64_t ars, int64_t acs,
                      const float* B, int64_t ldb, const uint32_t* B16, const float* C0,
                      int64_t ldc0, Epi& epi) {
  if (M <= 0 || NVt <= 0) return;
  const int64_t N = NVt * kW, Kp = k_padded(K), Mp = round_up(M, kTileRows);
  Bf16Buffers& buf = t_bf16_buffers;
  uint16_t* a16 = buf.a.get<uint16_t>(Mp * Kp);
  if (acs == 1)
    pack_a_rows(A, ars, M, K, a16);
  else  // ars == 1 (A read transposed)
    pack_a_transposed(A, acs, M, K, buf.t.get<uint32_t>(Kp / 2 * Mp), a16);
  int64_t ldv = ldb;
  if (B16 == nullptr) {
    uint32_t* b16 = buf.b.get<uint32_t>(Kp / 2 * N);
    pack_vnni(B, ldb, K, N, N, N, b16);
    B16 = b16;
    ldv = N;
  }
  blocks_product(M, NVt, K, a16, B16, ldv, C0, ldc0, epi);
}
