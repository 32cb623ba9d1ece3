// QnA learned-query local attention (docs/qna_attention.md, "Definition" and "Backward"), forward
// and backward, written once over the vocabulary of simd.h. The kernels see only
// QnaAttention{Fwd,Bwd}Args: raw pointers, element strides, sizes.
//
// Math, fp32 for every element type (o output pixel, t tap of its window, p_t the input pixel it
// reads, a = attn_scale, g = grad_out):
//   s[o,q,h,t] = cost[p_t,q,h] + rpe[t,q,h] over the in-bounds taps only
//   w = softmax_t(s),  lse = log sum_t exp(s),  out[o,h,:] = sum_t (sum_q w a)[t,h] v[p_t,h,:]
// Backward, with u[o,h,t] = g[o,h,:] . v[p_t,h,:]:
//   delta[o,q,h] = sum_t w a u,  ds = w (a u - delta),
//   drpe[t] = sum_o ds,  dattn_scale[t] = sum_o w u,
//   dcost[p] = sum of ds over the (o, t) with p_t = p,
//   dv[p,h,:] = the same sum of (sum_q w a) g[o,h,:].
//
// Work goes by image rows: a task first packs the rows it reads into fp32 scratch (so bf16 / fp16
// are converted once and any input strides cost nothing), then runs pixel by pixel.
// The backward makes one sweep over output pixels, as the forward: it recomputes the window's
// softmax, then adds every gradient term of its taps into per-task buffers: drpe / dattn_scale
// partial sums and the dcost / dv accumulators of the task's input rows. No atomics: tasks own
// their buffers; the input rows two tasks share are summed afterwards in a fixed order.
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
// through its sum and, per vector of lanes, falls back to direct exps with its own max when the
// reference sits more than kMaxReferenceScale above it.
//
// Two parts (see isa/kernels.inc): the interface, included normally (include guard; plain data, no
// torch, no intrinsics) and filled by ops/qna_attention.cpp; and the kernel, compiled only where
// isa/kernels.inc includes this header again inside an ISA namespace and target region
// (FVK_KERNEL_BODIES), after simd.h, kernel_common.h and attention_gemm.h.

// =============================================================================================
// Interface
// =============================================================================================

#ifndef FASTVIT_KERNELS_KERNELS_QNA_ATTENTION_H
#define FASTVIT_KERNELS_KERNELS_QNA_ATTENTION_H

#include <cstdint>

#include "kernels/elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// What forward and backward both read. Shapes: cost [B, Hi, Wi, Q, H], v [B, Hi, Wi, H, D];
// output pixel (oy, ox) reads the window of input pixels (oy * stride - pad + ty,
// ox * stride - pad + tx), tap t = ty * kernel_size + tx, out-of-bounds taps masked.
struct QnaAttentionInputs {
  int64_t B, Hi, Wi, Q, H, D;
  int64_t kernel_size, stride, pad, Ho, Wo;
  ElemType dtype;  // of cost, v, grad_out, out, dcost, dv
  // Element strides in [b, y, x, q, h] / [b, y, x, h, d] order (any values).
  const void* cost; int64_t cost_stride[5];
  const void* v; int64_t v_stride[5];
  // [k*k, Q, H] fp32, contiguous.
  const float* rpe;
  const float* attn_scale;
};

// Work split of a pass over image rows: task t covers image b = t / tasks_per_image and rows
// [(t % tasks_per_image) * rows_per_task, ...) of it. It depends only on the shapes, never on the
// thread count, so every result is bitwise reproducible for any number of threads.
struct RowTasks {
  int64_t rows_per_task, tasks_per_image;
};

struct QnaAttentionFwdArgs : QnaAttentionInputs {
  void* out;   // [B, Ho, Wo, H, D] contiguous
  float* lse;  // [B, Ho, Wo, Q, H] contiguous
  RowTasks tasks;  // over output rows
};

// The backward sweeps the output rows as the forward does (tasks over output rows). A task adds
// the gradient terms of its windows into its own buffers: drpe / dattn_scale partial sums, and
// dcost / dv of the input rows its windows read. Input rows that only one task reads are written
// to dcost / dv by that task; the at most edge_rows = k - stride rows read by two neighbouring
// tasks of an image go to the upper task's bottom edge slot and the lower task's top edge slot,
// summed afterwards (in that order) by the caller.
struct QnaAttentionBwdArgs : QnaAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[5];  // [B, Ho, Wo, H, D], any strides
  // [tasks][2][k*k][Q][H]: per task, its drpe then its dattn_scale partial sums; every task
  // writes its whole slice.
  float* param_grad_partial;
  // [tasks][2 (top, bottom)][edge_rows][Wi][Q*H + H*D]: per shared input pixel, its dcost then
  // its dv terms from this task (fp32). A slot holds rows from the first row the task shares.
  float* edge_partial;
  int64_t edge_rows;
  void* dcost;  // [B, Hi, Wi, Q, H] contiguous
  void* dv;     // [B, Hi, Wi, H, D] contiguous
  // Over output rows. Every task but an image's last has at least ceil(k / stride) rows, so that
  // no input row is read by more than two tasks.
  RowTasks tasks;
};

}  // namespace cpu
}  // namespace fastvit_kernels

#endif  // FASTVIT_KERNELS_KERNELS_QNA_ATTENTION_H

// =============================================================================================
// Kernel (one copy per ISA; entry points forward_kernel / backward_kernel)
// =============================================================================================

#ifdef FVK_KERNEL_BODIES
namespace qna_attention {

// ---------------------------------------------------------------------------------------------
// Constants, scratch memory and element access
// ---------------------------------------------------------------------------------------------

// How far (as a factor of the softmax sum) the task's reference may sit above a window before
// the window takes the direct-exp path: terms lost to underflow are then below 2^-94 of the sum,
// and the reference adds at most 2^-24 * ln(2^32) ~ 1.3e-6 relative rounding error.
constexpr float kMaxReferenceScale = 4294967296.0f;  // 2^32

// Channel vectors of the output accumulated at once (registers: 8 accumulators + temporaries).
constexpr int kValueBlock = 8;

// floor(a / b) and ceil(a / b) for b > 0 and a of any sign.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

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
//   cost-like rows (cost, rpe, attn_scale, lse, dcost, ...): lane q * Hq + h, QHp lanes; with
//     G > 1 a vector holds G queries.
//   d-major rows (v and grad_out in the backward): DG rows of Hv = max(Hq, kW) lanes; (h, d)
//     sits in row d / G, lane (d % G) * Hq + h, so a vector holds G values of d.
// A per-head quantity (u, sum_q w a) for the cost vector at lane l is the vector at lane l % Hv of
// a row of Hv per-head lanes, its value for head h repeated in each of the G groups:
// group_sum() folds the G groups of d (or of queries) into every group at once.
struct Layout {
  int64_t H, D, Q;
  int64_t Hq, G;  // padded heads; groups per vector
  int64_t QH;     // Q * H: a pixel's cost (and lse, dcost) in the tensors
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
// rearranged by `from`, their first `count` elements stored at dst + off + p * dst_stride.
template <ElemType T>
inline void store_pixels(const float* src, int64_t src_stride, int64_t n, const LaneMap& from,
                         int64_t count, int64_t dst_stride, const Layout& L, float* staging,
                         void* dst, int64_t off) {
  for (int64_t p = 0; p < n; ++p) from.apply(src + p * src_stride, staging + p * L.staging);
  for (int64_t p = 0; p < n; ++p)
    store_row<T>(dst, off + p * dst_stride, count, staging + p * L.staging);
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
// The backward normalises by the same sum as the forward, so its weights are the forward's.
inline void window_exp(const Layout& L, int64_t n, const int32_t* taps, const int32_t* pixels,
                       const TapTables& tt, const InputRows& in, float* e, float* inv_sum,
                       float* lse) {
  const int64_t QHp = L.QHp;
  for (int64_t l = 0; l < QHp; l += kW) {
    const auto tap_exp = [&](int64_t i) {
      const vf ei =
          vmul(vload(in.exp_cost + pixels[i] * QHp + l), vload(tt.exp_rpe + taps[i] * QHp + l));
      vstore(e + i * QHp + l, ei);
      return ei;
    };
    // Four partial sums: one chain of dependent adds would bound the loop by their latency.
    vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      s0 = vadd(s0, tap_exp(i));
      s1 = vadd(s1, tap_exp(i + 1));
      s2 = vadd(s2, tap_exp(i + 2));
      s3 = vadd(s3, tap_exp(i + 3));
    }
    for (; i < n; ++i) s0 = vadd(s0, tap_exp(i));
    vf sum = vadd(vadd(s0, s1), vadd(s2, s3));
    vf ref = vadd(vload(in.cost_max + l), vload(tt.rpe_max + l));
    vf inv = vdiv(vset1(1.0f), sum);
    if (!vall_le(inv, kMaxReferenceScale)) {
      // This window's scores lie far below the task's reference: direct exps, own max.
      vf m = vset1(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; ++j) {
        const vf sj = vadd(vload(in.cost + pixels[j] * QHp + l), vload(tt.rpe + taps[j] * QHp + l));
        vstore(e + j * QHp + l, sj);
        m = vmax(m, sj);
      }
      sum = vzero();
      for (int64_t j = 0; j < n; ++j) {
        const vf ej = vexp(vsub(vload(e + j * QHp + l), m));
        vstore(e + j * QHp + l, ej);
        sum = vadd(sum, ej);
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
  // With few vectors, even and odd taps go to two sets of accumulators, so that the latency of
  // each accumulator's chain of FMAs does not bound the loop.
  constexpr int kSets = NV <= 4 ? 2 : 1;
  vf acc[kSets][NV];
  vindex lane_head[NV];
  int32_t head0[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    for (int set = 0; set < kSets; ++set) acc[set][c] = vzero();
    lane_head[c] = vload_index(L.lane_head.data() + (j0 + c) * kW);
    head0[c] = L.head0[j0 + c];
  }
  const auto add_tap = [&](vf* sum, int64_t i) {
    const float* mixed = w.mixed + i * L.Hw;
    const float* values = w.in.values + pixels[i] * L.Cp + j0 * kW;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c)
      sum[c] = vfma(vpermute(vload(mixed + head0[c]), lane_head[c]), vload(values + c * kW), sum[c]);
  };
  int64_t i = 0;
  for (; i + kSets <= n; i += kSets)
    for (int set = 0; set < kSets; ++set) add_tap(acc[set], i + set);
  if (i < n) add_tap(acc[0], i);
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    for (int set = 1; set < kSets; ++set) acc[0][c] = vadd(acc[0][c], acc[set][c]);
    vstore(w.out + (j0 + c) * kW, acc[0][c]);
  }
}

// Calls f(std::integral_constant<int, nv>{}) for nv in 1 .. kValueBlock: the register blocking
// of weighted_values.
template <class F>
inline void with_vector_count(int64_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
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
        with_vector_count(std::min<int64_t>(kValueBlock, vectors - j),
                          [&](auto nv) { weighted_values<nv>(L, j, n, pixels, w); });
      store_row<T>(a.out, (o_row + ox) * L.C, L.C, w.out);
    }
    store_pixels<ElemType::kFloat32>(w.lse, L.QHp, a.Wo, L.from_lanes, L.QH, L.QH, L, w.staging,
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
// Backward
// ---------------------------------------------------------------------------------------------

// u for the per-head vector at g and v, two d-major pixels: sum over the DG rows (Hv apart),
// then over the G groups of d.
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

// Per-thread backward buffers. The accumulators cover the task's input rows (those of `in`).
struct BwdScratch {
  TapTables tables;
  InputRows in;
  float* dcost;    // [pixel][QHp]: accumulated dcost of the input rows
  float* dv;       // [pixel][DHv]: accumulated dv, d-major
  float* grad;     // [Wo][DHv]: grad_out of an output row, d-major
  float* e;        // [taps][QHp]: exp(s - ref), then the softmax weights w
  float* inv_sum;  // [QHp]
  float* lse;      // [QHp] (unused)
  float* u;        // [taps][Hv]: grad . v per head
  float* drpe;     // [taps][QHp]: the task's partial sums
  float* dscale;   // [taps][QHp]
  float* staging;  // [max(Wi, taps)][staging], see load_pixels

  int64_t carve(float* base, const QnaAttentionInputs& a, const Layout& L, int64_t max_pixels) {
    Carver c(base);
    tables.carve(c, L);
    in.carve(c, L, max_pixels, L.DHv);
    dcost = c.take(max_pixels * L.QHp);
    dv = c.take(max_pixels * L.DHv);
    grad = c.take(a.Wo * L.DHv);
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

// One output pixel (grad_out d-major [DHv]): its window's softmax again (normalised by the same
// sum as the forward, so the weights sum to 1 up to rounding and ds cancels cleanly), then every
// gradient term of its taps: drpe, dattn_scale, and dcost / dv of the input pixels they read.
inline void backward_window(const Layout& L, int64_t n, const int32_t* taps,
                            const int32_t* pixels, const float* grad, const BwdScratch& w) {
  const TapTables& tt = w.tables;
  const int64_t QHp = L.QHp, Hv = L.Hv;
  window_exp(L, n, taps, pixels, tt, w.in, w.e, w.inv_sum, w.lse);
  for (int64_t hc = 0; hc < Hv; hc += kW)
    for (int64_t i = 0; i < n; ++i)
      vstore(w.u + i * Hv + hc, head_dot(L, grad + hc, w.in.values + pixels[i] * L.DHv + hc));
  for (int64_t l = 0; l < QHp; l += kW) {
    const int64_t hc = l % Hv;
    const vf inv = vload(w.inv_sum + l);
    // delta and the sum of the weights, over even and odd taps in two chains each (latency).
    vf delta[2] = {vzero(), vzero()}, weight_sum[2] = {vzero(), vzero()};
    for (int64_t i = 0; i < n; ++i) {
      const vf wt = vmul(vload(w.e + i * QHp + l), inv);
      vstore(w.e + i * QHp + l, wt);
      weight_sum[i & 1] = vadd(weight_sum[i & 1], wt);
      delta[i & 1] =
          vfma(wt, vmul(vload(tt.scale + taps[i] * QHp + l), vload(w.u + i * Hv + hc)), delta[i & 1]);
    }
    const vf delta_sum = vadd(delta[0], delta[1]), weights = vadd(weight_sum[0], weight_sum[1]);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = taps[i] * QHp + l;
      const vf wt = vload(w.e + i * QHp + l), u = vload(w.u + i * Hv + hc);
      vstore(w.dscale + t, vfma(wt, u, vload(w.dscale + t)));
      // w (a u - delta) with a u scaled by the rounded sum of the weights (~1): then the ds of a
      // window sum to 0 up to rounding, and a one-tap window gives 0.
      const vf ds = vmul(wt, vsub(vmul(vmul(vload(tt.scale + t), u), weights), delta_sum));
      vstore(w.drpe + t, vadd(vload(w.drpe + t), ds));
      float* dcost = w.dcost + pixels[i] * QHp + l;
      vstore(dcost, vadd(vload(dcost), ds));
    }
  }
  // dv[p_i] += (sum_q w a) * grad, per head.
  for (int64_t hc = 0; hc < Hv; hc += kW) {
    for (int64_t i = 0; i < n; ++i) {
      vf mixed = vzero();
      for (int64_t l = hc; l < QHp; l += Hv)
        mixed = vfma(vload(w.e + i * QHp + l), vload(tt.scale + taps[i] * QHp + l), mixed);
      mixed = L.group_sum(mixed);
      float* dv = w.dv + pixels[i] * L.DHv + hc;
      for (int64_t r = 0; r < L.DG; ++r)
        vstore(dv + r * Hv, vfma(mixed, vload(grad + r * Hv + hc), vload(dv + r * Hv)));
    }
  }
}

// Output rows [oy_begin, oy_end) of image b. The task's drpe / dattn_scale partial sums go to
// `partial` ([2][taps][Q][H]); dcost and dv of the input rows only this task reads go to the
// outputs, those of the rows it shares with the task above / below to its edge slots (see
// QnaAttentionBwdArgs).
template <ElemType T>
inline void backward_rows(const QnaAttentionBwdArgs& a, const Layout& L, int64_t b,
                          int64_t oy_begin, int64_t oy_end, float* partial, float* top_edge,
                          float* bottom_edge, BwdScratch& w, int32_t* taps, int32_t* pixels) {
  InputRows& in = w.in;
  input_rows_read(a, oy_begin, oy_end, &in.y_begin, &in.y_end);
  pack_cost_rows<T>(a, L, b, w.staging, in);
  pack_value_rows_d_major<T>(a, L, b, w.staging, in);
  const int64_t pixels_in = (in.y_end - in.y_begin) * a.Wi;
  std::fill(w.dcost, w.dcost + pixels_in * L.QHp, 0.0f);
  std::fill(w.dv, w.dv + pixels_in * L.DHv, 0.0f);
  std::fill(w.drpe, w.drpe + L.taps * L.QHp, 0.0f);
  std::fill(w.dscale, w.dscale + L.taps * L.QHp, 0.0f);
  const int64_t* gs = a.grad_out_stride;
  for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
    load_pixels<T>(a.grad_out, b * gs[0] + oy * gs[1], gs[2], a.Wo, gs[3], gs[4], a.H, a.D,
                   L.to_d_major, L, w.staging, w.grad, L.DHv);
    for (int64_t ox = 0; ox < a.Wo; ++ox) {
      const int64_t n = window_taps(a, oy, ox, in.y_begin, taps, pixels);
      backward_window(L, n, taps, pixels, w.grad + ox * L.DHv, w);
    }
  }
  store_pixels<ElemType::kFloat32>(w.drpe, L.QHp, L.taps, L.from_lanes, L.QH, L.QH, L, w.staging,
                                   partial, 0);
  store_pixels<ElemType::kFloat32>(w.dscale, L.QHp, L.taps, L.from_lanes, L.QH, L.QH, L,
                                   w.staging, partial, L.taps * L.QH);

  // Rows before above_end are also read by the task above (if any), rows from below_begin on by
  // the task below.
  int64_t above_end = in.y_begin, below_begin = in.y_end, unused;
  if (oy_begin > 0) input_rows_read(a, oy_begin - 1, oy_begin, &unused, &above_end);
  if (oy_end < a.Ho) input_rows_read(a, oy_end, oy_end + 1, &below_begin, &unused);
  const int64_t edge_pixel = L.QH + L.C;
  for (int64_t y = in.y_begin; y < in.y_end; ++y) {
    const float* dcost = w.dcost + (y - in.y_begin) * a.Wi * L.QHp;
    const float* dv = w.dv + (y - in.y_begin) * a.Wi * L.DHv;
    float* edge = y < above_end ? top_edge + (y - in.y_begin) * a.Wi * edge_pixel
                  : y >= below_begin ? bottom_edge + (y - below_begin) * a.Wi * edge_pixel
                                     : nullptr;
    if (edge != nullptr) {
      store_pixels<ElemType::kFloat32>(dcost, L.QHp, a.Wi, L.from_lanes, L.QH, edge_pixel, L,
                                       w.staging, edge, 0);
      store_pixels<ElemType::kFloat32>(dv, L.DHv, a.Wi, L.from_d_major, L.C, edge_pixel, L,
                                       w.staging, edge, L.QH);
    } else {
      const int64_t p = (b * a.Hi + y) * a.Wi;
      store_pixels<T>(dcost, L.QHp, a.Wi, L.from_lanes, L.QH, L.QH, L, w.staging, a.dcost,
                      p * L.QH);
      store_pixels<T>(dv, L.DHv, a.Wi, L.from_d_major, L.C, L.C, L, w.staging, a.dv, p * L.C);
    }
  }
  // Input rows no window reads (stride > k leaves gaps; the bottom of the image) get zeros from
  // the task above them.
  const int64_t gap_end = oy_end < a.Ho ? below_begin : a.Hi;
  for (int64_t y = in.y_end; y < gap_end; ++y) {
    using E = Elem<T>;
    const int64_t p = (b * a.Hi + y) * a.Wi;
    std::fill_n(static_cast<typename E::type*>(a.dcost) + p * L.QH, a.Wi * L.QH, E::from_f32(0.0f));
    std::fill_n(static_cast<typename E::type*>(a.dv) + p * L.C, a.Wi * L.C, E::from_f32(0.0f));
  }
}

template <ElemType T>
inline void backward_impl(const QnaAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  const Layout L(a);
  const int64_t rows = a.tasks.rows_per_task;
  const int64_t max_pixels = std::min(a.Hi, (rows - 1) * a.stride + a.kernel_size) * a.Wi;
  BwdScratch w{};
  std::vector<float> mem(w.carve(nullptr, a, L, max_pixels));
  w.carve(mem.data(), a, L, max_pixels);
  w.tables.fill(a, L);
  std::vector<int32_t> taps(L.taps), pixels(L.taps);
  const int64_t partial_floats = 2 * L.taps * L.QH;
  const int64_t edge_floats = a.edge_rows * a.Wi * (L.QH + L.C);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy_begin = task % a.tasks.tasks_per_image * rows;
    float* edges = a.edge_partial + task * 2 * edge_floats;
    backward_rows<T>(a, L, b, oy_begin, std::min(a.Ho, oy_begin + rows),
                     a.param_grad_partial + task * partial_floats, edges, edges + edge_floats, w,
                     taps.data(), pixels.data());
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

inline void backward_kernel(const QnaAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_impl<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_impl<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_impl<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

}  // namespace qna_attention
#endif  // FVK_KERNEL_BODIES
