// QnA learned-query local attention (SPEC.md §3), forward and backward, written once over the
// vocabulary of simd.h. Included inside an ISA namespace by qna_attention_{avx512,avx2,scalar}.cpp
// after simd.h (see simd.h for why nothing is included here). The kernels see only
// QnaAttention{Fwd,Bwd}Args: raw pointers, element strides, sizes.
//
// Math, fp32 for every element type (o output pixel, t tap of its window, p_t the input pixel it
// reads, a = attn_scale, g = grad_out):
//   s[o,q,h,t] = cost[p_t,q,h] + rpe[t,q,h] over the in-bounds taps only
//   w = softmax_t(s),  lse = log sum_t exp(s),  out[o,h,:] = sum_t (sum_q w a)[t,h] v[p_t,h,:]
// Backward, with u[o,h,t] = g[o,h,:] . v[p_t,h,:]:
//   delta[o,q,h] = sum_t w a u,  ds = w (a u - delta),  drpe[t] = sum_o ds,  dattn_scale[t] = sum_o w u,
//   dcost[p] = sum of ds over the (o, t) with p_t = p,  dv[p,h,:] = the same sum of (sum_q w a) g[o,h,:].
//
// Work goes by image rows: a task first packs the rows it reads into fp32 scratch (so bf16 / fp16
// are converted once and any input strides cost nothing), then runs pixel by pixel.
// The backward never scatters: pass 1 (by_output) computes delta per output pixel and the
// per-task partial sums of drpe / dattn_scale; pass 2 (by_input) gathers dcost and dv of each
// input pixel from the (at most k*k) output pixels whose window holds it, recomputing w and u.
//
// Vector lanes (see Layout). The softmax runs across (query, head) lanes; the forward's weighted
// sum of values across a pixel's channel vector [h][d] as stored, each tap's head weight spread
// over the head's d lanes by a lane permutation (repacking v d-major instead was measured slower
// at k = 3). The backward needs u, a dot product per head over d, so it packs v and grad_out
// "d-major" (heads in lanes) and stays in head lanes.
//
// Exponentials. exp(cost + rpe - ref) = exp(cost - M) * exp(rpe - Rmax) * exp(M + Rmax - ref),
// with M the max of cost over the task's rows and Rmax the max of rpe over the taps (per lane):
// a task computes exp(cost - M) once per input pixel, and a tap then costs two multiplies instead
// of an exp (k*k fewer exps). Up to rounding this is exact while the window's own scores are not
// far below the reference M + Rmax; otherwise the products underflow. Each window checks that
// through its sum (forward, backward pass 1) or exp(M + Rmax - lse) (pass 2) and, per vector of
// lanes, falls back to direct exps when the reference sits more than kMaxReferenceScale above it.

// ---------------------------------------------------------------------------------------------
// Constants, scratch memory and element access
// ---------------------------------------------------------------------------------------------

// How far (as a factor of the softmax sum) the task's reference may sit above a window before
// the window takes the direct-exp path: terms lost to underflow are then below 2^-94 of the sum,
// and the reference adds at most 2^-24 * ln(2^32) ~ 1.3e-6 relative rounding error.
constexpr float kMaxReferenceScale = 4294967296.0f;  // 2^32

// Channel vectors of the output accumulated at once (registers: 8 accumulators + temporaries).
constexpr int kValueBlock = 8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// floor(a / b) and ceil(a / b) for b > 0 and a of any sign.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Hands out consecutive pieces of `base`, each a whole number of 16 floats (64 bytes); with
// base == nullptr it only counts, so one function both sizes and carves a set of buffers.
class Carver {
 public:
  explicit Carver(float* base) : base_(base) {}
  float* take(int64_t n) {
    float* p = base_ != nullptr ? base_ + used_ : nullptr;
    used_ += round_up(std::max<int64_t>(n, 1), 16);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  float* base_;
  int64_t used_ = 0;
};

template <ElemType T> struct Elem;
template <> struct Elem<ElemType::kFloat32> {
  using type = float;
  static float to_f32(float x) { return x; }
  static float from_f32(float x) { return x; }
  static vf load(const float* p) { return vload(p); }
  static void store(float* p, vf x) { vstore(p, x); }
};
template <> struct Elem<ElemType::kBFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return bf16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_bf16(x); }
  static vf load(const uint16_t* p) { return vload_bf16(p); }
  static void store(uint16_t* p, vf x) { vstore_bf16(p, x); }
};
template <> struct Elem<ElemType::kFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return f16_to_f32(x); }
  static uint16_t from_f32(float x) { return f32_to_f16(x); }
  static vf load(const uint16_t* p) { return vload_f16(p); }
  static void store(uint16_t* p, vf x) { vstore_f16(p, x); }
};

// dst[i] = src[off + i * stride] for i < n, converted to fp32.
template <ElemType T>
inline void load_row(const void* src, int64_t off, int64_t stride, int64_t n, float* dst) {
  using E = Elem<T>;
  const typename E::type* s = static_cast<const typename E::type*>(src) + off;
  int64_t i = 0;
  if (stride == 1)
    for (; i + kW <= n; i += kW) vstore(dst + i, E::load(s + i));
  for (; i < n; ++i) dst[i] = E::to_f32(s[i * stride]);
}

// dst[off + i] = src[i] for i < n (outputs are contiguous), rounded to T.
template <ElemType T>
inline void store_row(void* dst, int64_t off, int64_t n, const float* src) {
  using E = Elem<T>;
  typename E::type* o = static_cast<typename E::type*>(dst) + off;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) E::store(o + i, vload(src + i));
  for (; i < n; ++i) o[i] = E::from_f32(src[i]);
}

// One pixel's [outer, inner] block of x (cost's [Q, H], v's and grad_out's [H, D]) as the dense
// fp32 row dst[o * inner + i]; whole vectors when it is one unit-stride run.
template <ElemType T>
inline void load_block(const void* x, int64_t off, int64_t outer_stride, int64_t inner_stride,
                       int64_t outer, int64_t inner, float* dst) {
  if (outer_stride == inner * inner_stride) {
    load_row<T>(x, off, inner_stride, outer * inner, dst);
    return;
  }
  for (int64_t o = 0; o < outer; ++o)
    load_row<T>(x, off + o * outer_stride, inner_stride, inner, dst + o * inner);
}

// ---------------------------------------------------------------------------------------------
// Lane layout and window geometry
// ---------------------------------------------------------------------------------------------

// A fixed rearrangement of a pixel's fp32 row, one gather per vector: dst[j] = src[index[j]].
struct LaneMap {
  std::vector<int32_t> index;  // a whole number of vectors

  void apply(const float* src, float* dst) const {
    for (size_t j = 0; j < index.size(); j += kW)
      vstore(dst + j, vgather(src, vload_index(index.data() + j)));
  }
};

// How one call lays its data out in vector lanes, and the index tables that go with it.
//
// Heads are padded to Hq: a power of two when H < kW, so that G = kW / Hq groups share a vector
// (QnA-ViT tiny has H = 8 heads on 16 AVX-512 lanes); else a multiple of kW (G = 1).
//   cost-like rows (cost, rpe, attn_scale, lse, delta, ...): lane q * Hq + h, QHp lanes; with
//     G > 1 a vector holds G queries.
//   d-major rows (v and grad_out in the backward): DG rows of Hv = max(Hq, kW) lanes; (h, d)
//     sits in row d / G, lane (d % G) * Hq + h, so a vector holds G values of d.
// A per-head quantity (u, sum_q w a) for the cost vector at lane l is the vector at lane l % Hv of
// a row of Hv per-head lanes, its value for head h repeated in each of the G groups:
// group_sum() folds the G groups of d (or of queries) into every group at once.
struct Layout {
  int64_t H, D, Q;
  int64_t Hq, G;  // padded heads; groups per vector
  int64_t QH;     // Q * H: a pixel's cost (and lse, delta, dcost) in the tensors
  int64_t QHp;    // a packed cost-like pixel
  int64_t C, Cp;  // H * D channels; rounded up to kW: a packed value pixel (forward)
  int64_t Hv;     // max(Hq, kW): lanes of a per-head row
  int64_t DG;     // ceil(D / G): rows of a d-major pixel
  int64_t DHv;    // DG * Hv: a packed d-major pixel
  int64_t Hw;     // Hv + kW: a per-head row of folded weights, so a load at any head < H fits
  int64_t taps;   // k * k
  int64_t staging;  // a pixel's row on its way between the tensors and the lanes (load_pixels)

  LaneMap to_lanes;      // cost-like: [q * H + h] -> lanes; padding from src[Q * H] (a 0)
  LaneMap from_lanes;    // lanes -> [q * H + h]
  LaneMap to_d_major;    // [h * D + d] -> d-major; padding from src[C] (a 0)
  LaneMap from_d_major;  // d-major -> [h * D + d]
  // Channel vector j of a value pixel (channels c = j * kW + l) holds heads head0[j] +
  // lane_head[j * kW + l] (at most kW of them, so one load of folded weights from head0 has all).
  std::vector<int32_t> head0, lane_head;
  // group_sum: x + x rotated by s lanes, for s = kW / 2, kW / 4, ..., Hq.
  std::vector<int32_t> rotations;

  explicit Layout(const QnaAttentionInputs& a)
      : H(a.H), D(a.D), Q(a.Q), taps(a.kernel_size * a.kernel_size) {
    Hq = H >= kW ? round_up(H, kW) : 1;
    while (Hq < H) Hq *= 2;
    G = std::max<int64_t>(1, kW / Hq);
    QH = Q * H;
    QHp = round_up(Q * Hq, kW);
    C = H * D;
    Cp = round_up(C, kW);
    Hv = std::max<int64_t>(Hq, kW);
    DG = (D + G - 1) / G;
    DHv = DG * Hv;
    Hw = Hv + kW;
    staging = round_up(std::max(QH, C) + 1, kW);

    to_lanes.index.resize(QHp);
    for (int64_t l = 0; l < QHp; ++l) {
      const int64_t q = l / Hq, h = l % Hq;
      to_lanes.index[l] = static_cast<int32_t>(q < Q && h < H ? q * H + h : QH);
    }
    from_lanes.index.assign(round_up(QH, kW), 0);
    for (int64_t j = 0; j < QH; ++j)
      from_lanes.index[j] = static_cast<int32_t>(j / H * Hq + j % H);
    to_d_major.index.resize(DHv);
    for (int64_t r = 0; r < DHv; ++r) {
      const int64_t d = r / Hv * G + r % Hv / Hq, h = r % Hq;
      to_d_major.index[r] = static_cast<int32_t>(d < D && h < H ? h * D + d : C);
    }
    from_d_major.index.assign(Cp, 0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t h = c / D, d = c % D;
      from_d_major.index[c] = static_cast<int32_t>(d / G * Hv + d % G * Hq + h);
    }
    head0.resize(Cp / kW);
    lane_head.resize(Cp);
    for (int64_t j = 0; j < Cp / kW; ++j) {
      head0[j] = static_cast<int32_t>(j * kW / D);
      for (int64_t l = 0; l < kW; ++l) {
        const int64_t c = std::min(j * kW + l, C - 1);
        lane_head[j * kW + l] = static_cast<int32_t>(c / D - head0[j]);
      }
    }
    for (int64_t s = kW / 2; s >= Hq; s /= 2)
      for (int64_t l = 0; l < kW; ++l) rotations.push_back(static_cast<int32_t>((l + s) % kW));
  }

  // Every lane gets the sum of the G lanes of its head (one per group).
  vf group_sum(vf x) const {
    for (size_t r = 0; r < rotations.size(); r += kW)
      x = vadd(x, vpermute(x, vload_index(rotations.data() + r)));
    return x;
  }
};

// Input rows [begin, end) that output rows [oy_begin, oy_end) read.
inline void input_rows_read(const QnaAttentionInputs& a, int64_t oy_begin, int64_t oy_end,
                            int64_t* begin, int64_t* end) {
  *begin = std::max<int64_t>(0, oy_begin * a.stride - a.pad);
  *end = std::min(a.Hi, (oy_end - 1) * a.stride - a.pad + a.kernel_size);
}

// Output rows (or columns) whose window holds input rows [y_begin, y_end): o * stride - pad <= y
// <= o * stride - pad + k - 1, clipped to [0, size).
inline void outputs_reading(const QnaAttentionInputs& a, int64_t y_begin, int64_t y_end,
                            int64_t size, int64_t* begin, int64_t* end) {
  *begin = std::max<int64_t>(0, ceil_div(y_begin + a.pad - a.kernel_size + 1, a.stride));
  *end = std::min(size, floor_div(y_end - 1 + a.pad, a.stride) + 1);
}

// The in-bounds taps of output pixel (oy, ox): tap index t and the index of its input pixel in
// rows packed from input row y_begin on. Returns their number (>= 1: the centre is inside).
inline int64_t window_taps(const QnaAttentionInputs& a, int64_t oy, int64_t ox, int64_t y_begin,
                           int32_t* taps, int32_t* pixels) {
  const int64_t k = a.kernel_size;
  const int64_t y0 = oy * a.stride - a.pad, x0 = ox * a.stride - a.pad;
  const int64_t ty_end = std::min(k, a.Hi - y0), tx_end = std::min(k, a.Wi - x0);
  int64_t n = 0;
  for (int64_t ty = std::max<int64_t>(0, -y0); ty < ty_end; ++ty) {
    for (int64_t tx = std::max<int64_t>(0, -x0); tx < tx_end; ++tx, ++n) {
      taps[n] = static_cast<int32_t>(ty * k + tx);
      pixels[n] = static_cast<int32_t>((y0 + ty - y_begin) * a.Wi + x0 + tx);
    }
  }
  return n;
}

// rpe and attn_scale in cost lanes [t][QHp], plus exp(rpe - Rmax) and Rmax (the max over taps,
// per lane). Padding lanes: rpe 0, attn_scale 0, exp 1.
struct TapTables {
  float* rpe;      // [taps][QHp]
  float* scale;    // [taps][QHp]
  float* exp_rpe;  // [taps][QHp]
  float* rpe_max;  // [QHp]

  void carve(Carver& c, const Layout& L) {
    rpe = c.take(L.taps * L.QHp);
    scale = c.take(L.taps * L.QHp);
    exp_rpe = c.take(L.taps * L.QHp);
    rpe_max = c.take(L.QHp);
  }

  void fill(const QnaAttentionInputs& a, const Layout& L) {
    for (int64_t t = 0; t < L.taps; ++t) {
      for (int64_t l = 0; l < L.QHp; ++l) {
        const int64_t q = l / L.Hq, h = l % L.Hq, src = (t * a.Q + q) * a.H + h;
        const bool inside = q < a.Q && h < a.H;
        rpe[t * L.QHp + l] = inside ? a.rpe[src] : 0.0f;
        scale[t * L.QHp + l] = inside ? a.attn_scale[src] : 0.0f;
      }
    }
    for (int64_t l = 0; l < L.QHp; l += kW) {
      vf m = vload(rpe + l);
      for (int64_t t = 1; t < L.taps; ++t) m = vmax(m, vload(rpe + t * L.QHp + l));
      vstore(rpe_max + l, m);
      for (int64_t t = 0; t < L.taps; ++t)
        vstore(exp_rpe + t * L.QHp + l, vexp(vsub(vload(rpe + t * L.QHp + l), m)));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Packing rows
// ---------------------------------------------------------------------------------------------

// n pixels of x (pixel p at off + p * pixel_stride), each an [outer, inner] block, rearranged by
// `to` into dst + p * dst_stride. Every pixel is staged (staging: n * Layout::staging floats)
// before the first gather: a gather cannot take its elements from stores still in flight, so
// gathering right behind the staging stores would stall on each pixel.
template <ElemType T>
inline void load_pixels(const void* x, int64_t off, int64_t pixel_stride, int64_t n,
                        int64_t outer_stride, int64_t inner_stride, int64_t outer, int64_t inner,
                        const LaneMap& to, const Layout& L, float* staging, float* dst,
                        int64_t dst_stride) {
  for (int64_t p = 0; p < n; ++p) {
    float* row = staging + p * L.staging;
    load_block<T>(x, off + p * pixel_stride, outer_stride, inner_stride, outer, inner, row);
    row[outer * inner] = 0.0f;
  }
  for (int64_t p = 0; p < n; ++p) to.apply(staging + p * L.staging, dst + p * dst_stride);
}

// The reverse: n packed pixels (src + p * src_stride, written a while ago, for the same reason)
// rearranged by `from` into the contiguous rows of `count` elements at dst + off.
template <ElemType T>
inline void store_pixels(const float* src, int64_t src_stride, int64_t n, const LaneMap& from,
                         int64_t count, const Layout& L, float* staging, void* dst, int64_t off) {
  for (int64_t p = 0; p < n; ++p) from.apply(src + p * src_stride, staging + p * L.staging);
  for (int64_t p = 0; p < n; ++p)
    store_row<T>(dst, off + p * count, count, staging + p * L.staging);
}

// A task's input rows [y_begin, y_end) of one image as fp32. cost_max is the M of the exponential
// factorisation (see the top of this file).
struct InputRows {
  int64_t y_begin, y_end;
  float* cost;      // [pixel][QHp], padding lanes zero
  float* exp_cost;  // exp(cost - cost_max)
  float* cost_max;  // [QHp]: max over the rows' pixels
  float* values;    // forward: [pixel][Cp], channels [h][d]; backward: [pixel][DHv] d-major

  void carve(Carver& c, const Layout& L, int64_t max_pixels, int64_t value_floats) {
    cost = c.take(max_pixels * L.QHp);
    exp_cost = c.take(max_pixels * L.QHp);
    cost_max = c.take(L.QHp);
    values = c.take(max_pixels * value_floats);
  }
};

template <ElemType T>
inline void pack_cost_rows(const QnaAttentionInputs& a, const Layout& L, int64_t b,
                           float* staging, InputRows& in) {
  const int64_t* s = a.cost_stride;
  const int64_t pixels = (in.y_end - in.y_begin) * a.Wi;
  for (int64_t y = in.y_begin; y < in.y_end; ++y)
    load_pixels<T>(a.cost, b * s[0] + y * s[1], s[2], a.Wi, s[3], s[4], a.Q, a.H, L.to_lanes, L,
                   staging, in.cost + (y - in.y_begin) * a.Wi * L.QHp, L.QHp);
  for (int64_t l = 0; l < L.QHp; l += kW) {
    vf m = vload(in.cost + l);
    for (int64_t p = 1; p < pixels; ++p) m = vmax(m, vload(in.cost + p * L.QHp + l));
    vstore(in.cost_max + l, m);
    for (int64_t p = 0; p < pixels; ++p)
      vstore(in.exp_cost + p * L.QHp + l, vexp(vsub(vload(in.cost + p * L.QHp + l), m)));
  }
}

// Forward values: [pixel][Cp] with channel c = h * D + d, lanes past C zero.
template <ElemType T>
inline void pack_value_rows(const QnaAttentionInputs& a, const Layout& L, int64_t b,
                            InputRows& in) {
  const int64_t* s = a.v_stride;
  for (int64_t y = in.y_begin; y < in.y_end; ++y) {
    for (int64_t x = 0; x < a.Wi; ++x) {
      float* dst = in.values + ((y - in.y_begin) * a.Wi + x) * L.Cp;
      load_block<T>(a.v, b * s[0] + y * s[1] + x * s[2], s[3], s[4], a.H, a.D, dst);
      std::fill(dst + L.C, dst + L.Cp, 0.0f);
    }
  }
}

// Backward values: d-major [pixel][DHv].
template <ElemType T>
inline void pack_value_rows_d_major(const QnaAttentionInputs& a, const Layout& L, int64_t b,
                                    float* staging, InputRows& in) {
  const int64_t* s = a.v_stride;
  for (int64_t y = in.y_begin; y < in.y_end; ++y)
    load_pixels<T>(a.v, b * s[0] + y * s[1], s[2], a.Wi, s[3], s[4], a.H, a.D, L.to_d_major, L,
                   staging, in.values + (y - in.y_begin) * a.Wi * L.DHv, L.DHv);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// exp(s - ref) of one output pixel's n taps in every lane (e[i][QHp]), 1 / their sum and lse.
// Forward and backward (pass 1) both normalise by this sum, so the backward's weights are the
// forward's and sum to 1 up to rounding: delta is then a convex combination of the a u, and
// ds = w (a u - delta) cancels cleanly.
inline void window_exp(const Layout& L, int64_t n, const int32_t* taps, const int32_t* pixels,
                       const TapTables& tt, const InputRows& in, float* e, float* inv_sum,
                       float* lse) {
  const int64_t QHp = L.QHp;
  for (int64_t l = 0; l < QHp; l += kW) {
    vf sum = vzero();
    for (int64_t i = 0; i < n; ++i) {
      const vf ei = vmul(vload(in.exp_cost + pixels[i] * QHp + l), vload(tt.exp_rpe + taps[i] * QHp + l));
      vstore(e + i * QHp + l, ei);
      sum = vadd(sum, ei);
    }
    vf ref = vadd(vload(in.cost_max + l), vload(tt.rpe_max + l));
    vf inv = vdiv(vset1(1.0f), sum);
    if (!vall_le(inv, kMaxReferenceScale)) {
      // This window's scores lie far below the task's reference: direct exps, own max.
      vf m = vset1(-std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < n; ++i) {
        const vf si = vadd(vload(in.cost + pixels[i] * QHp + l), vload(tt.rpe + taps[i] * QHp + l));
        vstore(e + i * QHp + l, si);
        m = vmax(m, si);
      }
      sum = vzero();
      for (int64_t i = 0; i < n; ++i) {
        const vf ei = vexp(vsub(vload(e + i * QHp + l), m));
        vstore(e + i * QHp + l, ei);
        sum = vadd(sum, ei);
      }
      ref = m;
      inv = vdiv(vset1(1.0f), sum);
    }
    vstore(lse + l, vadd(ref, vlog(sum)));
    vstore(inv_sum + l, inv);
  }
}

// Per-thread forward buffers.
struct FwdScratch {
  TapTables tables;
  InputRows in;
  float* e;        // [taps][QHp]: exp(s - ref) of the current window
  float* mixed;    // [taps][Hw]: sum_q w a, the weight of each tap's value per head
  float* lse;      // [Wo][QHp]: an output row's
  float* inv_sum;  // [QHp]
  float* out;      // [Cp]: one output pixel before rounding to T
  float* staging;  // [Wi][staging], see load_pixels

  int64_t carve(float* base, const QnaAttentionInputs& a, const Layout& L, int64_t max_pixels) {
    Carver c(base);
    tables.carve(c, L);
    in.carve(c, L, max_pixels, L.Cp);
    e = c.take(L.taps * L.QHp);
    mixed = c.take(L.taps * L.Hw);
    lse = c.take(a.Wo * L.QHp);
    inv_sum = c.take(L.QHp);
    out = c.take(L.Cp);
    staging = c.take(a.Wi * L.staging);
    return c.used();
  }
};

// The softmax of one output pixel's n taps folded over the queries:
// mixed[i][h] = sum_q w[q, h, i] * attn_scale[taps[i], q, h]; and lse ([QHp]).
inline void window_softmax(const Layout& L, int64_t n, const int32_t* taps, const int32_t* pixels,
                           const FwdScratch& w, float* lse) {
  const int64_t QHp = L.QHp;
  window_exp(L, n, taps, pixels, w.tables, w.in, w.e, w.inv_sum, lse);
  for (int64_t hc = 0; hc < L.Hv; hc += kW) {
    for (int64_t i = 0; i < n; ++i) {
      vf acc = vzero();
      for (int64_t l = hc; l < QHp; l += L.Hv) {  // the cost vectors of heads hc..
        const vf weight = vmul(vload(w.e + i * QHp + l), vload(w.inv_sum + l));
        acc = vfma(weight, vload(w.tables.scale + taps[i] * QHp + l), acc);
      }
      vstore(w.mixed + i * L.Hw + hc, L.group_sum(acc));
    }
  }
}

// out[j] = sum_i mixed[i][head of lane] * values[pixels[i]][j] for the NV channel vectors
// j = j0 .. j0 + NV - 1.
template <int NV>
inline void weighted_values(const Layout& L, int64_t j0, int64_t n, const int32_t* pixels,
                            const FwdScratch& w) {
  vf acc[NV];
  vindex lane_head[NV];
  int32_t head0[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    acc[c] = vzero();
    lane_head[c] = vload_index(L.lane_head.data() + (j0 + c) * kW);
    head0[c] = L.head0[j0 + c];
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* mixed = w.mixed + i * L.Hw;
    const float* values = w.in.values + pixels[i] * L.Cp + j0 * kW;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      const vf weight = vpermute(vload(mixed + head0[c]), lane_head[c]);
      acc[c] = vfma(weight, vload(values + c * kW), acc[c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) vstore(w.out + (j0 + c) * kW, acc[c]);
}

inline void weighted_values_dispatch(int nv, const Layout& L, int64_t j0, int64_t n,
                                     const int32_t* pixels, const FwdScratch& w) {
  switch (nv) {
    case 1: weighted_values<1>(L, j0, n, pixels, w); break;
    case 2: weighted_values<2>(L, j0, n, pixels, w); break;
    case 3: weighted_values<3>(L, j0, n, pixels, w); break;
    case 4: weighted_values<4>(L, j0, n, pixels, w); break;
    case 5: weighted_values<5>(L, j0, n, pixels, w); break;
    case 6: weighted_values<6>(L, j0, n, pixels, w); break;
    case 7: weighted_values<7>(L, j0, n, pixels, w); break;
    case 8: weighted_values<8>(L, j0, n, pixels, w); break;
  }
}

// Output rows [oy_begin, oy_end) of image b.
template <ElemType T>
inline void forward_rows(const QnaAttentionFwdArgs& a, const Layout& L, int64_t b,
                         int64_t oy_begin, int64_t oy_end, FwdScratch& w, int32_t* taps,
                         int32_t* pixels) {
  input_rows_read(a, oy_begin, oy_end, &w.in.y_begin, &w.in.y_end);
  pack_cost_rows<T>(a, L, b, w.staging, w.in);
  pack_value_rows<T>(a, L, b, w.in);
  const int64_t vectors = L.Cp / kW;
  for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
    const int64_t o_row = (b * a.Ho + oy) * a.Wo;
    for (int64_t ox = 0; ox < a.Wo; ++ox) {
      const int64_t n = window_taps(a, oy, ox, w.in.y_begin, taps, pixels);
      window_softmax(L, n, taps, pixels, w, w.lse + ox * L.QHp);
      for (int64_t j = 0; j < vectors; j += kValueBlock)
        weighted_values_dispatch(static_cast<int>(std::min<int64_t>(kValueBlock, vectors - j)), L,
                                 j, n, pixels, w);
      store_row<T>(a.out, (o_row + ox) * L.C, L.C, w.out);
    }
    store_pixels<ElemType::kFloat32>(w.lse, L.QHp, a.Wo, L.from_lanes, L.QH, L, w.staging,
                                     a.lse, o_row * L.QH);
  }
}

template <ElemType T>
inline void forward_impl(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const Layout L(a);
  const int64_t rows = a.tasks.rows_per_task;
  const int64_t max_pixels = std::min(a.Hi, (rows - 1) * a.stride + a.kernel_size) * a.Wi;
  FwdScratch w{};
  std::vector<float> mem(w.carve(nullptr, a, L, max_pixels));
  w.carve(mem.data(), a, L, max_pixels);
  w.tables.fill(a, L);
  std::vector<int32_t> taps(L.taps), pixels(L.taps);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy_begin = task % a.tasks.tasks_per_image * rows;
    forward_rows<T>(a, L, b, oy_begin, std::min(a.Ho, oy_begin + rows), w, taps.data(),
                    pixels.data());
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1: by output pixel
// ---------------------------------------------------------------------------------------------

// u for the per-head vector at g and v, two d-major pixels: sum over the DG rows (Hv apart),
// then over the G groups of d. Both passes compute u through here, so they get the same bits.
inline vf head_dot(const Layout& L, const float* g, const float* v) {
  vf even = vzero(), odd = vzero();
  const int64_t Hv = L.Hv;
  int64_t r = 0;
  for (; r + 2 <= L.DG; r += 2) {  // two chains halve the latency
    even = vfma(vload(g + r * Hv), vload(v + r * Hv), even);
    odd = vfma(vload(g + (r + 1) * Hv), vload(v + (r + 1) * Hv), odd);
  }
  if (r < L.DG) even = vfma(vload(g + r * Hv), vload(v + r * Hv), even);
  return L.group_sum(vadd(even, odd));
}

// Per-thread buffers of pass 1.
struct BwdOutputScratch {
  TapTables tables;
  InputRows in;
  float* grad;     // [Wo][DHv]: grad_out of an output row, d-major
  float* delta;    // [Wo][QHp]: the row's
  float* e;        // [taps][QHp]: exp(s - ref), then the softmax weights w
  float* inv_sum;  // [QHp]
  float* lse;      // [QHp] (unused: pass 2 reads the forward's)
  float* u;        // [taps][Hv]: grad . v per head
  float* drpe;     // [taps][QHp]: the task's partial sums
  float* dscale;   // [taps][QHp]
  float* staging;  // [max(Wi, taps)][staging], see load_pixels

  int64_t carve(float* base, const QnaAttentionInputs& a, const Layout& L, int64_t max_pixels) {
    Carver c(base);
    tables.carve(c, L);
    in.carve(c, L, max_pixels, L.DHv);
    grad = c.take(a.Wo * L.DHv);
    delta = c.take(a.Wo * L.QHp);
    e = c.take(L.taps * L.QHp);
    inv_sum = c.take(L.QHp);
    lse = c.take(L.QHp);
    u = c.take(L.taps * L.Hv);
    drpe = c.take(L.taps * L.QHp);
    dscale = c.take(L.taps * L.QHp);
    staging = c.take(std::max(a.Wi, L.taps) * L.staging);
    return c.used();
  }
};

// One output pixel (grad_out d-major [DHv]): delta ([QHp]) and its window's terms of drpe /
// dattn_scale.
inline void backward_window(const Layout& L, int64_t n, const int32_t* taps,
                            const int32_t* pixels, const float* grad, float* delta_out,
                            const BwdOutputScratch& w) {
  const TapTables& tt = w.tables;
  const int64_t QHp = L.QHp, Hv = L.Hv;
  window_exp(L, n, taps, pixels, tt, w.in, w.e, w.inv_sum, w.lse);
  for (int64_t hc = 0; hc < Hv; hc += kW)
    for (int64_t i = 0; i < n; ++i)
      vstore(w.u + i * Hv + hc, head_dot(L, grad + hc, w.in.values + pixels[i] * L.DHv + hc));
  for (int64_t l = 0; l < QHp; l += kW) {
    const int64_t hc = l % Hv;
    const vf inv = vload(w.inv_sum + l);
    vf delta = vzero(), weight_sum = vzero();
    for (int64_t i = 0; i < n; ++i) {
      const vf wt = vmul(vload(w.e + i * QHp + l), inv);
      vstore(w.e + i * QHp + l, wt);
      weight_sum = vadd(weight_sum, wt);
      delta = vfma(wt, vmul(vload(tt.scale + taps[i] * QHp + l), vload(w.u + i * Hv + hc)), delta);
    }
    vstore(delta_out + l, delta);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = taps[i] * QHp + l;
      const vf wt = vload(w.e + i * QHp + l), u = vload(w.u + i * Hv + hc);
      vstore(w.dscale + t, vfma(wt, u, vload(w.dscale + t)));
      // w (a u - delta) with a u scaled by the rounded sum of the weights (~1): then the ds of a
      // window sum to 0 up to rounding, and a one-tap window gives 0.
      const vf ds = vmul(wt, vsub(vmul(vmul(vload(tt.scale + t), u), weight_sum), delta));
      vstore(w.drpe + t, vadd(vload(w.drpe + t), ds));
    }
  }
}

// Output rows [oy_begin, oy_end) of image b; the task's drpe / dattn_scale partial sums go to
// `partial` ([2][taps][Q][H]).
template <ElemType T>
inline void backward_output_rows(const QnaAttentionBwdArgs& a, const Layout& L, int64_t b,
                                 int64_t oy_begin, int64_t oy_end, float* partial,
                                 BwdOutputScratch& w, int32_t* taps, int32_t* pixels) {
  input_rows_read(a, oy_begin, oy_end, &w.in.y_begin, &w.in.y_end);
  pack_cost_rows<T>(a, L, b, w.staging, w.in);
  pack_value_rows_d_major<T>(a, L, b, w.staging, w.in);
  std::fill(w.drpe, w.drpe + L.taps * L.QHp, 0.0f);
  std::fill(w.dscale, w.dscale + L.taps * L.QHp, 0.0f);
  const int64_t* gs = a.grad_out_stride;
  for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
    load_pixels<T>(a.grad_out, b * gs[0] + oy * gs[1], gs[2], a.Wo, gs[3], gs[4], a.H, a.D,
                   L.to_d_major, L, w.staging, w.grad, L.DHv);
    for (int64_t ox = 0; ox < a.Wo; ++ox) {
      const int64_t n = window_taps(a, oy, ox, w.in.y_begin, taps, pixels);
      backward_window(L, n, taps, pixels, w.grad + ox * L.DHv, w.delta + ox * L.QHp, w);
    }
    store_pixels<ElemType::kFloat32>(w.delta, L.QHp, a.Wo, L.from_lanes, L.QH, L, w.staging,
                                     a.delta, (b * a.Ho + oy) * a.Wo * L.QH);
  }
  store_pixels<ElemType::kFloat32>(w.drpe, L.QHp, L.taps, L.from_lanes, L.QH, L, w.staging,
                                   partial, 0);
  store_pixels<ElemType::kFloat32>(w.dscale, L.QHp, L.taps, L.from_lanes, L.QH, L, w.staging,
                                   partial, L.taps * L.QH);
}

template <ElemType T>
inline void backward_by_output_impl(const QnaAttentionBwdArgs& a, int64_t task_begin,
                                    int64_t task_end) {
  const Layout L(a);
  const int64_t rows = a.output_tasks.rows_per_task;
  const int64_t max_pixels = std::min(a.Hi, (rows - 1) * a.stride + a.kernel_size) * a.Wi;
  BwdOutputScratch w{};
  std::vector<float> mem(w.carve(nullptr, a, L, max_pixels));
  w.carve(mem.data(), a, L, max_pixels);
  w.tables.fill(a, L);
  std::vector<int32_t> taps(L.taps), pixels(L.taps);
  const int64_t partial_floats = 2 * L.taps * L.QH;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.output_tasks.tasks_per_image;
    const int64_t oy_begin = task % a.output_tasks.tasks_per_image * rows;
    backward_output_rows<T>(a, L, b, oy_begin, std::min(a.Ho, oy_begin + rows),
                            a.param_grad_partial + task * partial_floats, w, taps.data(),
                            pixels.data());
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 2: by input pixel
// ---------------------------------------------------------------------------------------------

// The output rows a task's input rows feed, packed: what pass 2 reads per (output, input) pair.
struct OutputRows {
  int64_t oy_begin, oy_end;
  float* grad;        // [pixel][DHv]: grad_out, d-major
  float* delta;       // [pixel][QHp]
  float* lse;         // [pixel][QHp]
  float* ref_scale;   // [pixel][QHp]: exp(M + Rmax - lse), M of the task's input rows
  uint8_t* factored;  // [pixel][QHp / kW]: ref_scale accepted for that vector

  void carve(Carver& c, const Layout& L, int64_t max_pixels) {
    grad = c.take(max_pixels * L.DHv);
    delta = c.take(max_pixels * L.QHp);
    lse = c.take(max_pixels * L.QHp);
    ref_scale = c.take(max_pixels * L.QHp);
    // Flags as bytes inside a float buffer: one allocation for everything.
    factored = reinterpret_cast<uint8_t*>(c.take((max_pixels * (L.QHp / kW) + 3) / 4));
  }
};

struct BwdInputScratch {
  TapTables tables;
  InputRows in;
  OutputRows out;
  float* w;        // [QHp]: softmax weights of one (output, input) pair
  float* dcost;    // [Wi][QHp]: an input row's accumulators
  float* dv;       // [Wi][DHv]
  float* staging;  // [Wi][staging], see load_pixels

  int64_t carve(float* base, const QnaAttentionInputs& a, const Layout& L, int64_t max_in_pixels,
                int64_t max_out_pixels) {
    Carver c(base);
    tables.carve(c, L);
    in.carve(c, L, max_in_pixels, L.DHv);
    out.carve(c, L, max_out_pixels);
    w = c.take(L.QHp);
    dcost = c.take(a.Wi * L.QHp);
    dv = c.take(a.Wi * L.DHv);
    staging = c.take(a.Wi * L.staging);
    return c.used();
  }
};

template <ElemType T>
inline void pack_output_rows(const QnaAttentionBwdArgs& a, const Layout& L, int64_t b,
                             const InputRows& in, const TapTables& tt, float* staging,
                             OutputRows& out) {
  const int64_t* gs = a.grad_out_stride;
  for (int64_t oy = out.oy_begin; oy < out.oy_end; ++oy) {
    const int64_t o = (b * a.Ho + oy) * a.Wo, j = (oy - out.oy_begin) * a.Wo;
    load_pixels<T>(a.grad_out, b * gs[0] + oy * gs[1], gs[2], a.Wo, gs[3], gs[4], a.H, a.D,
                   L.to_d_major, L, staging, out.grad + j * L.DHv, L.DHv);
    load_pixels<ElemType::kFloat32>(a.delta, o * L.QH, L.QH, a.Wo, a.H, 1, a.Q, a.H, L.to_lanes,
                                    L, staging, out.delta + j * L.QHp, L.QHp);
    load_pixels<ElemType::kFloat32>(a.lse, o * L.QH, L.QH, a.Wo, a.H, 1, a.Q, a.H, L.to_lanes, L,
                                    staging, out.lse + j * L.QHp, L.QHp);
  }
  const int64_t pixels = (out.oy_end - out.oy_begin) * a.Wo;
  for (int64_t j = 0; j < pixels; ++j) {
    for (int64_t l = 0; l < L.QHp; l += kW) {
      const vf ref_scale = vexp(vsub(vadd(vload(in.cost_max + l), vload(tt.rpe_max + l)),
                                     vload(out.lse + j * L.QHp + l)));
      vstore(out.ref_scale + j * L.QHp + l, ref_scale);
      out.factored[j * (L.QHp / kW) + l / kW] = vall_le(ref_scale, kMaxReferenceScale);
    }
  }
}

// The softmax weight of one (output, input) pair in one vector: from the factorisation,
// exp(cost - M) * exp(rpe - Rmax) * exp(M + Rmax - lse), or, where the output's reference scale
// was refused, exp(cost + rpe - lse) directly.
struct TapWeight {
  const float* exp_cost;   // of the input pixel
  const float* cost;
  const float* exp_rpe;    // of the tap
  const float* rpe;
  const float* ref_scale;  // of the output pixel
  const float* lse;

  vf operator()(bool factored) const {
    if (factored) return vmul(vmul(vload(exp_cost), vload(exp_rpe)), vload(ref_scale));
    return vexp(vsub(vadd(vload(cost), vload(rpe)), vload(lse)));
  }
};

// Input pixel (y, x): dcost ([QHp]) and dv ([DHv], d-major) accumulated over every output pixel
// whose window holds it.
inline void gather_input_pixel(const QnaAttentionInputs& a, const Layout& L, int64_t y,
                               int64_t x, const BwdInputScratch& w, float* dcost,
                               float* dv_acc) {
  const TapTables& tt = w.tables;
  const InputRows& in = w.in;
  const OutputRows& out = w.out;
  const int64_t QHp = L.QHp, Hv = L.Hv, k = a.kernel_size;
  const int64_t p = (y - in.y_begin) * a.Wi + x;
  const float* v = in.values + p * L.DHv;
  std::fill(dcost, dcost + QHp, 0.0f);
  std::fill(dv_acc, dv_acc + L.DHv, 0.0f);
  int64_t oy_begin, oy_end, ox_begin, ox_end;
  outputs_reading(a, y, y + 1, a.Ho, &oy_begin, &oy_end);
  outputs_reading(a, x, x + 1, a.Wo, &ox_begin, &ox_end);
  for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
    for (int64_t ox = ox_begin; ox < ox_end; ++ox) {
      const int64_t tap = (y - oy * a.stride + a.pad) * k + (x - ox * a.stride + a.pad);
      const int64_t o = (oy - out.oy_begin) * a.Wo + ox;
      const float* grad = out.grad + o * L.DHv;
      for (int64_t hc = 0; hc < Hv; hc += kW) {
        // w of each cost vector of these heads, and sum_q w a: the weight of grad in dv.
        vf mixed = vzero();
        for (int64_t l = hc; l < QHp; l += Hv) {
          const int64_t pl = p * QHp + l, tl = tap * QHp + l, ol = o * QHp + l;
          const TapWeight weight{in.exp_cost + pl, in.cost + pl, tt.exp_rpe + tl, tt.rpe + tl,
                                 out.ref_scale + ol, out.lse + ol};
          const vf wt = weight(out.factored[o * (QHp / kW) + l / kW] != 0);
          vstore(w.w + l, wt);
          mixed = vfma(wt, vload(tt.scale + tl), mixed);
        }
        mixed = L.group_sum(mixed);
        const vf u = head_dot(L, grad + hc, v + hc);
        for (int64_t r = 0; r < L.DG; ++r) {
          float* dv = dv_acc + r * Hv + hc;
          vstore(dv, vfma(mixed, vload(grad + r * Hv + hc), vload(dv)));
        }
        for (int64_t l = hc; l < QHp; l += Hv) {
          const vf ds = vmul(vload(w.w + l), vsub(vmul(vload(tt.scale + tap * QHp + l), u),
                                                  vload(out.delta + o * QHp + l)));
          vstore(dcost + l, vadd(vload(dcost + l), ds));
        }
      }
    }
  }
}

// Input rows [y_begin, y_end) of image b.
template <ElemType T>
inline void backward_input_rows(const QnaAttentionBwdArgs& a, const Layout& L, int64_t b,
                                int64_t y_begin, int64_t y_end, BwdInputScratch& w) {
  w.in.y_begin = y_begin;
  w.in.y_end = y_end;
  pack_cost_rows<T>(a, L, b, w.staging, w.in);
  pack_value_rows_d_major<T>(a, L, b, w.staging, w.in);
  outputs_reading(a, y_begin, y_end, a.Ho, &w.out.oy_begin, &w.out.oy_end);
  pack_output_rows<T>(a, L, b, w.in, w.tables, w.staging, w.out);
  for (int64_t y = y_begin; y < y_end; ++y) {
    for (int64_t x = 0; x < a.Wi; ++x)
      gather_input_pixel(a, L, y, x, w, w.dcost + x * L.QHp, w.dv + x * L.DHv);
    const int64_t p = (b * a.Hi + y) * a.Wi;
    store_pixels<T>(w.dcost, L.QHp, a.Wi, L.from_lanes, L.QH, L, w.staging, a.dcost, p * L.QH);
    store_pixels<T>(w.dv, L.DHv, a.Wi, L.from_d_major, L.C, L, w.staging, a.dv, p * L.C);
  }
}

template <ElemType T>
inline void backward_by_input_impl(const QnaAttentionBwdArgs& a, int64_t task_begin,
                                   int64_t task_end) {
  const Layout L(a);
  const int64_t rows = a.input_tasks.rows_per_task;
  const int64_t max_out_rows = std::min(a.Ho, (rows + a.kernel_size - 2) / a.stride + 1);
  BwdInputScratch w{};
  std::vector<float> mem(w.carve(nullptr, a, L, rows * a.Wi, max_out_rows * a.Wo));
  w.carve(mem.data(), a, L, rows * a.Wi, max_out_rows * a.Wo);
  w.tables.fill(a, L);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.input_tasks.tasks_per_image;
    const int64_t y_begin = task % a.input_tasks.tasks_per_image * rows;
    backward_input_rows<T>(a, L, b, y_begin, std::min(a.Hi, y_begin + rows), w);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: one instantiation per element type
// ---------------------------------------------------------------------------------------------

inline void forward_kernel(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: forward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: forward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_by_output_kernel(const QnaAttentionBwdArgs& a, int64_t task_begin,
                                      int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_by_output_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_by_output_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_by_output_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_by_input_kernel(const QnaAttentionBwdArgs& a, int64_t task_begin,
                                     int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_by_input_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_by_input_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_by_input_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}
