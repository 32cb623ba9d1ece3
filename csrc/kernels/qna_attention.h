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

#include <algorithm>
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
  // Which kernel: output pixels in the vector lanes (true; see "Pixel lanes" below) or a pixel's
  // channels (false). Chosen by the op from the shapes only.
  bool pixel_lanes;
};

// The pixel-lane kernels' plane geometry (see "Pixel lanes"), also needed by the op to size its
// tasks: the shifts floor(-pad / stride) .. floor(pad / stride) of a window in units of the
// stride, and the pitch of a plane row (input columns of a phase plus the zero gap the shifts
// need, at least the output width plus the right shift).
inline int64_t qna_floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t qna_min_shift(const QnaAttentionInputs& a) { return qna_floor_div(-a.pad, a.stride); }
inline int64_t qna_max_shift(const QnaAttentionInputs& a) {
  return qna_floor_div(a.kernel_size - 1 - a.pad, a.stride);
}
inline int64_t qna_plane_pitch(const QnaAttentionInputs& a) {
  const int64_t columns = (a.Wi + a.stride - 1) / a.stride;  // of column phase 0, the widest
  const int64_t gap_left = -qna_min_shift(a), right = a.Wo + qna_max_shift(a);
  return std::max<int64_t>(1, std::max(columns + gap_left, right));
}

// Work split of a pass over image rows: task t covers image b = t / tasks_per_image and rows
// [(t % tasks_per_image) * rows_per_task, ...) of it. It depends only on the shapes, never on the
// thread count, so every result is bitwise reproducible for any number of threads.
struct RowTasks {
  int64_t rows_per_task, tasks_per_image;
};

// Images per task of the batch-lane forward (see "Batch lanes"): kQnaBatchLanes / kW vectors.
constexpr int64_t kQnaBatchLanes = 16;

struct QnaAttentionFwdArgs : QnaAttentionInputs {
  void* out;   // [B, Ho, Wo, H, D] contiguous
  float* lse;  // [B, Ho, Wo, Q, H] contiguous
  RowTasks tasks;  // over output rows
  // > 0: the batch-lane kernel runs instead, with tasks of kQnaBatchLanes images and batch_heads
  // heads (task t: images from t / ceil(H / batch_heads) * kQnaBatchLanes, heads from
  // t % ceil(H / batch_heads) * batch_heads); `tasks` is then unused.
  int64_t batch_heads;
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
  // [B (or 1, see sum_image_edges)][tasks_per_image - 1][2][edge_rows][Wi][Q*H + H*D]: per
  // pair of neighbouring tasks of an image, the upper task's bottom slot then the lower task's
  // top slot; per shared input pixel, its dcost then its dv terms from that task (fp32). A slot
  // holds rows from the first row the two tasks share. (An image's first task has no top slot,
  // its last no bottom slot.)
  float* edge_partial;
  int64_t edge_rows;
  // nullptr: edge_partial holds the whole batch's slots, which the caller sums once every task
  // has run. Else each kernel call covers whole images, edge_partial holds the slots of one image
  // (reused image by image), and the kernel calls sum_image_edges(a, b) after image b's last task.
  void (*sum_image_edges)(const QnaAttentionBwdArgs& a, int64_t image);
  void* dcost;  // [B, Hi, Wi, Q, H] contiguous
  void* dv;     // [B, Hi, Wi, H, D] contiguous
  // Over output rows. Every task but an image's last has at least ceil(k / stride) rows, so that
  // no input row is read by more than two tasks.
  RowTasks tasks;
};

// Floats in one edge slot (see QnaAttentionBwdArgs).
inline int64_t qna_edge_slot_floats(const QnaAttentionBwdArgs& a) {
  return a.edge_rows * a.Wi * (a.Q * a.H + a.H * a.D);
}

// The two slots of the rows tasks i and i + 1 of image b share (see QnaAttentionBwdArgs): the
// upper task's bottom slot, then, qna_edge_slot_floats(a) later, the lower task's top slot.
inline float* qna_pair_slots(const QnaAttentionBwdArgs& a, int64_t b, int64_t i) {
  const int64_t pairs_before = a.sum_image_edges != nullptr ? 0 : b * (a.tasks.tasks_per_image - 1);
  return a.edge_partial + 2 * (pairs_before + i) * qna_edge_slot_floats(a);
}

// The edge slots of a backward task (see QnaAttentionBwdArgs): its top slot, shared with the
// task above, and its bottom slot, shared with the task below; nullptr where the task has no such
// neighbour.
inline void qna_edge_slots(const QnaAttentionBwdArgs& a, int64_t task, float** top,
                           float** bottom) {
  const int64_t per_image = a.tasks.tasks_per_image;
  const int64_t b = task / per_image, i = task % per_image;
  *top = i > 0 ? qna_pair_slots(a, b, i - 1) + qna_edge_slot_floats(a) : nullptr;
  *bottom = i + 1 < per_image ? qna_pair_slots(a, b, i) : nullptr;
}

// After a backward task: sums its image's shared rows when it was the image's last task and the
// slots hold one image (see QnaAttentionBwdArgs::sum_image_edges).
inline void qna_image_done(const QnaAttentionBwdArgs& a, int64_t task) {
  if (a.sum_image_edges != nullptr && task % a.tasks.tasks_per_image == a.tasks.tasks_per_image - 1)
    a.sum_image_edges(a, task / a.tasks.tasks_per_image);
}

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

// A task's scratch is one zeroed AlignedBuffer (attention_gemm.h), so the carved buffers (whole
// cache lines each, see Carver) start on lines. std::vector's large blocks start 16 bytes past
// one, and where the pixel-lane planes did, the forward ran up to ~12% slower (harness, k = 5 at
// 28 x 28: 6.5 -> 5.9 ms), by chance of what else the heap held.

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
  const AlignedBuffer mem(w.carve(nullptr, a, L, max_pixels), /*zeroed=*/true);
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
  const AlignedBuffer mem(w.carve(nullptr, a, L, max_pixels), /*zeroed=*/true);
  w.carve(mem.data(), a, L, max_pixels);
  w.tables.fill(a, L);
  std::vector<int32_t> taps(L.taps), pixels(L.taps);
  const int64_t partial_floats = 2 * L.taps * L.QH;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy_begin = task % a.tasks.tasks_per_image * rows;
    float *top_edge, *bottom_edge;
    qna_edge_slots(a, task, &top_edge, &bottom_edge);
    backward_rows<T>(a, L, b, oy_begin, std::min(a.Ho, oy_begin + rows),
                     a.param_grad_partial + task * partial_floats, top_edge, bottom_edge, w,
                     taps.data(), pixels.data());
    qna_image_done(a, task);
  }
}

// ---------------------------------------------------------------------------------------------
// Pixel lanes (larger windows): a vector holds kW output pixels of one channel
// ---------------------------------------------------------------------------------------------
//
// The layout above puts a pixel's channels in the lanes. With d = 8 a head fills half an
// AVX-512 vector, so every tap of the value sum costs a lane permutation per vector next to its
// multiply-add, and the softmax works on Q*H lanes per pixel. Here the lanes are output pixels
// instead, as in a depthwise convolution: a head's softmax weight of a tap is one vector over
// kW output pixels, the value sum is d plain multiply-adds per tap, and nothing is permuted.
//
// Planes. A task packs the input rows it reads one plane per channel (cost, exp(cost - M) and v
// per (q, h) / (h, d); fp32). With stride s a channel has s*s phase planes: phase (ry, rx) holds
// the input pixels (Y*s + ry, X*s + rx), so that output pixel (oy, ox) reads, at tap (ty, tx),
// pixel (oy + sy, ox + sx) of phase plane (ry, rx), where ty - pad = sy*s + ry (0 <= ry < s), and
// the same for x. A phase plane stores its rows at a fixed pitch P with zeros between them
// (raw scores: -inf) at least as wide as the largest shift, and whole zero rows for rows outside
// the image: an output pixel at flat position j = r*P + ox (r = oy - first row of the task) reads
// tap t at j + off[t], every tap of every pixel the same way, and the taps outside the image read
// exp(cost) = 0, which is what masking them means. Lanes with ox >= Wo (the pitch's tail) compute
// garbage that is never stored; the backward zeroes their weights so they add nothing.
//
// Work. Heads are independent here, so a task runs head by head over its planes (a head's planes
// stay in L1), and within a head over blocks of kNJ vectors of output positions (the forward
// runs a last block of one vector when the task's positions end in a block's first vector).
// Forward per block: (1) the softmax sums S_q = sum_t exp(cost_q - M) exp(rpe - Rmax), one
// multiply-add per tap and query; (2) the weight of each tap, m_t = sum_q exp(cost_q - M)
// (exp(rpe - Rmax) attn_scale / S_q); (3) out_d = sum_t m_t v_d, d multiply-adds per tap. (2) is
// made in registers inside (3)'s loop over the taps (forward_block_fused) unless the block has a
// window on the direct path or the shapes do not fit its register blocking. The
// exponential factorisation and its per-vector fallback are those of the channel-lane kernel.
// Backward per block: the same sums; u_t = g . v_t; the weights w_qt, delta_q and the tap
// sums of dattn_scale; then, taps in column-major order (so that consecutive read-modify-writes
// of a plane never overlap), ds, drpe and dcost += ds, and dv += m_t g scattered into the task's
// input planes, which go back to pixel-major rows at the end as in the channel-lane kernel.

namespace pixel {

constexpr int kNJ = 2;       // output vectors per block
constexpr int kMaxRun = 8;   // taps of a run (forward_values_runs)
constexpr int kDChunk = 8;   // value channels per pass over the taps (registers: kNJ * 8 sums)

struct Planes {
  int64_t s, k, taps, pad;
  int64_t min_shift, max_shift;
  int64_t P;     // pitch of a plane row
  int64_t R;     // output rows of a task (at most)
  int64_t NR;    // plane rows: R + max_shift - min_shift
  int64_t lead;  // zeros before the first plane row: -min_shift
  int64_t Lp;    // one phase plane
  int64_t chs;   // one channel: s*s phase planes
  int64_t olen;  // output positions of a task, a whole number of blocks
  int64_t ostride;  // one output-side plane (olen plus a vector of slack for the transposes)
  std::vector<int32_t> columns;  // [s]: data columns of each column phase
  std::vector<int32_t> off;      // [taps]: read offset of tap t
  std::vector<int32_t> scatter;  // [taps]: the taps in column-major order
  // Runs of taps that read one phase-plane row at consecutive offsets (at most kMaxRun each):
  // run r covers run_taps[run_first[r] .. run_first[r + 1]) in increasing offset.
  std::vector<int32_t> run_taps, run_first;
  std::vector<int32_t> row_runs;  // [k + 1]: the runs of tap row ty are row_runs[ty] .. [ty + 1]
  // Per position p of a phase plane: its plane row Yrel and column X (-1: before the first row
  // or past the last), so that packing needs no division per position.
  std::vector<int32_t> pos_row, pos_col;
  // Whether the forward's values go by runs (forward_values_runs): measured faster where the runs
  // average 3 taps or more (k = 5 and 7 at stride 1, 7 at stride 2), slower with shorter ones.
  bool use_runs;

  Planes(const QnaAttentionInputs& a, int64_t rows_per_task)
      : s(a.stride), k(a.kernel_size), taps(a.kernel_size * a.kernel_size), pad(a.pad) {
    min_shift = qna_min_shift(a);
    max_shift = qna_max_shift(a);
    P = qna_plane_pitch(a);
    R = rows_per_task;
    NR = R + max_shift - min_shift;
    lead = -min_shift;
    Lp = round_up(lead + NR * P, kW);
    chs = s * s * Lp;
    olen = round_up(R * P, kNJ * kW);
    ostride = olen + kW;
    columns.resize(s);
    for (int64_t r = 0; r < s; ++r)
      columns[r] = static_cast<int32_t>(std::max<int64_t>(0, ceil_div(a.Wi - r, s)));
    off.resize(taps);
    for (int64_t ty = 0; ty < k; ++ty) {
      const int64_t sy = floor_div(ty - pad, s), ry = ty - pad - sy * s;
      for (int64_t tx = 0; tx < k; ++tx) {
        const int64_t sx = floor_div(tx - pad, s), rx = tx - pad - sx * s;
        off[ty * k + tx] =
            static_cast<int32_t>((ry * s + rx) * Lp + lead + (sy - min_shift) * P + sx);
      }
    }
    for (int64_t tx = 0; tx < k; ++tx)
      for (int64_t ty = 0; ty < k; ++ty) scatter.push_back(static_cast<int32_t>(ty * k + tx));
    // Taps of one row ty and column phase rx have consecutive sx, so consecutive offsets; a run
    // also ends where the offsets cross a multiple of kW (its values then lie in two aligned
    // vectors of a plane, block positions being multiples of kW).
    for (int64_t ty = 0; ty < k; ++ty) {
      row_runs.push_back(static_cast<int32_t>(run_first.size()));
      for (int64_t rx = 0; rx < s; ++rx) {
        int64_t in_run = 0;
        for (int64_t tx = 0; tx < k; ++tx) {
          if (floor_div(tx - pad, s) * s + rx != tx - pad) continue;
          const int64_t t = ty * k + tx;
          if (in_run == kMaxRun || (in_run > 0 && off[t] % kW == 0)) in_run = 0;
          if (in_run == 0) run_first.push_back(static_cast<int32_t>(run_taps.size()));
          run_taps.push_back(static_cast<int32_t>(t));
          ++in_run;
        }
      }
    }
    row_runs.push_back(static_cast<int32_t>(run_first.size()));
    run_first.push_back(static_cast<int32_t>(run_taps.size()));
    use_runs = taps >= 3 * (static_cast<int64_t>(run_first.size()) - 1);
    pos_row.assign(Lp, -1);
    pos_col.assign(Lp, 0);
    for (int64_t p = lead; p < Lp; ++p) {
      if ((p - lead) / P >= NR) break;
      pos_row[p] = static_cast<int32_t>((p - lead) / P);
      pos_col[p] = static_cast<int32_t>((p - lead) % P);
    }
  }
};

// Per-(head, query) scalars of every tap, [H][Q][taps], and Rmax [H][Q]: broadcast operands.
struct Tables {
  int64_t taps;
  std::vector<float> rpe, scale, er, ers, rmax;  // er = exp(rpe - Rmax), ers = er * attn_scale

  explicit Tables(const QnaAttentionInputs& a) : taps(a.kernel_size * a.kernel_size) {
    const int64_t n = a.H * a.Q * taps;
    rpe.resize(n); scale.resize(n); er.resize(n); ers.resize(n); rmax.resize(a.H * a.Q);
    for (int64_t h = 0; h < a.H; ++h) {
      for (int64_t q = 0; q < a.Q; ++q) {
        const int64_t row = (h * a.Q + q) * taps;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < taps; ++t) {
          rpe[row + t] = a.rpe[(t * a.Q + q) * a.H + h];
          scale[row + t] = a.attn_scale[(t * a.Q + q) * a.H + h];
          m = std::max(m, rpe[row + t]);
        }
        rmax[h * a.Q + q] = m;
        for (int64_t t = 0; t < taps; ++t) {
          er[row + t] = std::exp(rpe[row + t] - m);
          ers[row + t] = er[row + t] * scale[row + t];
        }
      }
    }
  }
  const float* of(const std::vector<float>& x, int64_t Q, int64_t h, int64_t q) const {
    return x.data() + (h * Q + q) * taps;
  }
};

// valid ? x : 0 for a 0 / 1 lane mask.
inline vf keep(vf valid, vf x) { return vsel_lt(vzero(), valid, x, vzero()); }

// Input planes of a task: channel c of the F = outer * inner of a pixel of x at
// planes + c * chs; phase (ry, rx) at (ry * s + rx) * Lp; there, row Yrel and column X at
// lead + Yrel * P + X, for input pixel ((y_first + Yrel) * s + ry, X * s + rx). Position p of a
// phase plane holds that pixel when it is in the image, else `gap`.
struct InputPosition {
  int64_t y, x;  // y < 0: a gap
};

inline InputPosition input_position(const Planes& g, int64_t phase, int64_t p, int64_t y_first,
                                    int64_t Hi) {
  const int64_t Yrel = g.pos_row[p];
  if (Yrel < 0) return {-1, 0};
  const int64_t ry = phase / g.s, rx = phase % g.s, X = g.pos_col[p];
  const int64_t y = (y_first + Yrel) * g.s + ry;
  if (X >= g.columns[rx] || y < 0 || y >= Hi) return {-1, 0};
  return {y, X * g.s + rx};
}

// Every position of the planes is written, kW positions at a time: their pixels (or gap) into
// staging ([kW][round_up(F, kW)]), then one transpose per kW channels. fp32 pixels with dense
// channels go straight from the tensor (the gaps from a row of `gap` in staging).
// kSkipGaps (gap_state: [s*s*Lp / kW], one flag per run of kW positions of a phase plane, kept
// by the caller across tasks on the same planes): runs without a pixel are written `full_gap`
// instead, and not at all when their flag says they already hold it (the same task rows of the
// next image leave the same runs empty); the flag is set there and cleared for runs with pixels.
// (int32 flags: with uint8_t ones, which may alias anything, GCC lost track of the packer's
// sizes and warned of an out-of-range loop in the scalar build.)
template <ElemType T, bool kSkipGaps = false>
inline void pack_input_planes(const void* x, const int64_t* st, int64_t b, int64_t Hi,
                              int64_t outer, int64_t inner, const Planes& g, int64_t y_first,
                              float gap, float* staging, float* planes,
                              int32_t* gap_state = nullptr, float full_gap = 0.0f) {
  const int64_t F = outer * inner, Fp = round_up(F, kW);
  const bool dense = T == ElemType::kFloat32 && st[4] == 1 && st[3] == inner && F % kW == 0;
  const vf gapv = vset1(gap);
  bool gap_row_ready = false;
  for (int64_t phase = 0; phase < g.s * g.s; ++phase) {
    float* plane = planes + phase * g.Lp;
    for (int64_t p0 = 0; p0 < g.Lp; p0 += kW) {
      InputPosition src[kW];
      int64_t pixels = 0;
      for (int64_t i = 0; i < kW; ++i) {
        src[i] = input_position(g, phase, p0 + i, y_first, Hi);
        pixels += src[i].y >= 0;
      }
      int32_t* state = kSkipGaps ? gap_state + (phase * g.Lp + p0) / kW : nullptr;
      if (pixels == 0) {
        if (state != nullptr && *state != 0) continue;
        const vf fill = state != nullptr ? vset1(full_gap) : gapv;
        for (int64_t c = 0; c < Fp; ++c) vstore(plane + c * g.chs + p0, fill);
        if (state != nullptr) *state = 1;
        continue;
      }
      if (state != nullptr) *state = 0;
      if (dense && pixels == kW && src[kW - 1].y == src[0].y) {  // kW pixels of one row
        const float* s0 = static_cast<const float*>(x) + b * st[0] + src[0].y * st[1] + src[0].x * st[2];
        for (int64_t c0 = 0; c0 < Fp; c0 += kW)
          transpose_block(s0 + c0, g.s * st[2], plane + c0 * g.chs + p0, g.chs);
        continue;
      }
      if (dense) {  // the same, the gaps read from a row of `gap`
        if (!gap_row_ready) {
          std::fill(staging, staging + Fp, gap);
          gap_row_ready = true;
        }
        const float* rows[kW];
        for (int64_t i = 0; i < kW; ++i)
          rows[i] = src[i].y >= 0 ? static_cast<const float*>(x) + b * st[0] + src[i].y * st[1] +
                                        src[i].x * st[2]
                                  : staging;
        for (int64_t c0 = 0; c0 < Fp; c0 += kW)
          transpose_rows([&](int i) { return rows[i] + c0; }, plane + c0 * g.chs + p0, g.chs);
        continue;
      }
      for (int64_t i = 0; i < kW; ++i) {
        float* row = staging + i * Fp;
        if (src[i].y >= 0) {
          load_block<T>(x, b * st[0] + src[i].y * st[1] + src[i].x * st[2], st[3], st[4], outer,
                        inner, row);
          std::fill(row + F, row + Fp, gap);
        } else {
          std::fill(row, row + Fp, gap);
        }
      }
      for (int64_t c0 = 0; c0 < Fp; c0 += kW)
        transpose_block(staging + c0, Fp, plane + c0 * g.chs + p0, g.chs);
    }
  }
}

// The reverse, for the input rows [y_begin, y_end): sink(y, x, row) gets each of their pixels'
// F channels (row: fp32, valid until the next call).
template <class Sink>
inline void unpack_input_planes(const float* planes, int64_t F, const Planes& g, int64_t y_first,
                                int64_t y_begin, int64_t y_end, float* staging, Sink&& sink) {
  const int64_t Fp = round_up(F, kW);
  for (int64_t phase = 0; phase < g.s * g.s; ++phase) {
    const float* plane = planes + phase * g.Lp;
    for (int64_t p0 = 0; p0 < g.Lp; p0 += kW) {
      InputPosition src[kW];
      bool any = false;
      for (int64_t i = 0; i < kW; ++i) {
        src[i] = input_position(g, phase, p0 + i, y_first, y_end);
        if (src[i].y < y_begin) src[i].y = -1;
        any |= src[i].y >= 0;
      }
      if (!any) continue;
      for (int64_t c0 = 0; c0 < Fp; c0 += kW)
        transpose_block(plane + c0 * g.chs + p0, g.chs, staging + c0, Fp);
      for (int64_t i = 0; i < kW; ++i)
        if (src[i].y >= 0) sink(src[i].y, src[i].x, staging + i * Fp);
    }
  }
}

// Output-side planes: channel c at planes + c * ostride, output (r, ox) of the task at r * P + ox.
// To the contiguous [R, Wo, F] rows at dst + off.
template <ElemType T>
inline void unpack_output_planes(const float* planes, int64_t F, const Planes& g, int64_t R,
                                 int64_t Wo, float* staging, void* dst, int64_t off) {
  const int64_t Fp = round_up(F, kW);
  for (int64_t p0 = 0; p0 < R * g.P; p0 += kW) {
    if (p0 % g.P >= Wo && p0 / g.P == (p0 + kW - 1) / g.P) continue;  // all in one row's gap
    for (int64_t c0 = 0; c0 < Fp; c0 += kW)
      transpose_block(planes + c0 * g.ostride + p0, g.ostride, staging + c0, Fp);
    for (int64_t i = 0; i < kW && p0 + i < R * g.P; ++i) {
      const int64_t r = (p0 + i) / g.P, ox = (p0 + i) % g.P;
      if (ox < Wo) store_row<T>(dst, off + (r * Wo + ox) * F, F, staging + i * Fp);
    }
  }
}

// The reverse for grad_out (any strides): R rows from output row oy0, gaps zero.
template <ElemType T>
inline void pack_output_planes(const void* x, const int64_t* st, int64_t b, int64_t oy0,
                               int64_t R, int64_t Wo, int64_t outer, int64_t inner,
                               const Planes& g, float* staging, float* planes) {
  const int64_t F = outer * inner, Fp = round_up(F, kW);
  for (int64_t p0 = 0; p0 < g.olen; p0 += kW) {
    bool any = false;
    for (int64_t i = 0; i < kW; ++i) {
      float* row = staging + i * Fp;
      const int64_t r = (p0 + i) / g.P, ox = (p0 + i) % g.P;
      if (r < R && ox < Wo) {
        load_block<T>(x, b * st[0] + (oy0 + r) * st[1] + ox * st[2], st[3], st[4], outer, inner,
                      row);
        std::fill(row + F, row + Fp, 0.0f);
        any = true;
      } else {
        std::fill(row, row + Fp, 0.0f);
      }
    }
    if (!any) {
      for (int64_t c = 0; c < Fp; ++c) vstore(planes + c * g.ostride + p0, vzero());
      continue;
    }
    for (int64_t c0 = 0; c0 < Fp; c0 += kW)
      transpose_block(staging + c0, Fp, planes + c0 * g.ostride + p0, g.ostride);
  }
}

// Part `part` of `parts` of the input pixels that output rows [oy0, oy0 + R) of image b read
// (their cost and v blocks, when each is one dense run): prefetched while the task before runs,
// since packing from cold memory (a pixel's channels, then a jump of stride pixels) leaves the
// hardware prefetchers behind. T's element size: esize.
inline void prefetch_task_part(const QnaAttentionInputs& a, int64_t esize, int64_t b, int64_t oy0,
                               int64_t R, int64_t part, int64_t parts) {
  int64_t y_begin, y_end;
  input_rows_read(a, oy0, oy0 + R, &y_begin, &y_end);
  const int64_t n = (y_end - y_begin) * a.Wi, first = n * part / parts, last = n * (part + 1) / parts;
  const auto run = [&](const void* x, const int64_t* st, int64_t outer, int64_t inner, int64_t p) {
    if (st[4] != 1 || st[3] != inner) return;
    const char* base = static_cast<const char*>(x) +
                       (b * st[0] + (y_begin + p / a.Wi) * st[1] + p % a.Wi * st[2]) * esize;
    for (int64_t i = 0; i < outer * inner * esize; i += 64) prefetch(base + i);
  };
  for (int64_t p = first; p < last; ++p) {
    run(a.cost, a.cost_stride, a.Q, a.H, p);
    run(a.v, a.v_stride, a.H, a.D, p);
  }
}

// What forward and backward tasks share: the input planes of the task and where things are.
struct TaskPlanes {
  float* raw;       // [QHp][chs] cost, gaps -inf; packed only when a window needs it
  float* ec;        // [QHp][chs] exp(cost - M), gaps 0
  float* cost_max;  // [QHp] M
  float* v;         // [Cp][chs]
  float* valid;     // [olen] 1 for output positions of the task, else 0
  float* staging;   // [kW][max(QHp, Cp)]
  bool raw_ready;
  int64_t b, y_first;  // of the packed task
  // Per run of kW positions of a phase plane: 1 when ec / v hold their final gap value (0) there
  // (see pack_input_planes). Kept across tasks.
  std::vector<int32_t> ec_gap, v_gap;

  void carve(Carver& c, const QnaAttentionInputs& a, const Planes& g) {
    const int64_t QHp = round_up(a.Q * a.H, kW), Cp = round_up(a.H * a.D, kW);
    // Reads of garbage lanes run up to a block (and the largest shift) past a channel's planes.
    const int64_t slack = (kNJ + 1) * kW + g.max_shift + g.P;
    raw = c.take(QHp * g.chs + slack);
    ec = c.take(QHp * g.chs + slack);
    cost_max = c.take(QHp);
    v = c.take(Cp * g.chs + slack);
    valid = c.take(g.olen);
    staging = c.take(kW * std::max(QHp, Cp));
    ec_gap.assign(g.chs / kW, 0);
    v_gap.assign(g.chs / kW, 0);
  }

  // Packs the task (image b, output rows [oy0, oy0 + R)): exp(cost - M) and v. Runs of the
  // planes without a pixel are written once per buffer (see pack_input_planes; measured in the
  // harness, one thread, fp32 forward at the QnA-ViT tiny maps: 2-5% faster at stride 2 and at
  // k = 7, never slower).
  // With value_pairs (bf16 inputs at the avx512bf16 level, see run_value_pairs) v holds value
  // pairs instead: position p of a channel the bf16 pair v[p] | v[p + 1] << 16 in one 32-bit
  // element. Every run of v is written then (a pair at a run's end reads the next run).
  template <ElemType T>
  void pack(const QnaAttentionInputs& a, const Planes& g, int64_t image, int64_t oy0, int64_t R,
            bool value_pairs = false) {
    b = image;
    y_first = oy0 + g.min_shift;
    raw_ready = false;
    const int64_t QH = a.Q * a.H;
    // Skipped runs hold exp(-inf) = 0 already and are left out of the max and the exps.
    pack_input_planes<T, true>(a.cost, a.cost_stride, b, a.Hi, a.Q, a.H, g, y_first,
                               -std::numeric_limits<float>::infinity(), staging, ec,
                               ec_gap.data(), 0.0f);
    const int32_t* empty = ec_gap.data();
    for (int64_t c = 0; c < QH; ++c) {
      float* e = ec + c * g.chs;
      vf m = vset1(-std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < g.chs; i += kW)
        if (empty[i / kW] == 0) m = vmax(vload(e + i), m);
      cost_max[c] = vhmax(m);
      const vf mv = vset1(cost_max[c]);
      for (int64_t i = 0; i < g.chs; i += kW)
        if (empty[i / kW] == 0) vstore(e + i, vexp(vsub(vload(e + i), mv)));
    }
    // The padding channels (read by garbage lanes past the last channel) hold -inf: zeros.
    std::fill(ec + QH * g.chs, ec + round_up(QH, kW) * g.chs, 0.0f);
    if (value_pairs) {
      pack_input_planes<T>(a.v, a.v_stride, b, a.Hi, a.H, a.D, g, y_first, 0.0f, staging, v);
      to_value_pairs(v, round_up(a.H * a.D, kW) * g.chs);
    } else {
      pack_input_planes<T, true>(a.v, a.v_stride, b, a.Hi, a.H, a.D, g, y_first, 0.0f, staging, v,
                                 v_gap.data(), 0.0f);
    }
    for (int64_t j = 0; j < g.olen; ++j)
      valid[j] = j < R * g.P && j % g.P < a.Wo ? 1.0f : 0.0f;
  }

  // x[p] = the pair x[p] | x[p + 1] << 16 of bf16 values (held as fp32, so the conversion is
  // exact) for p < n, in increasing p so that x[p + 1] is still a value; x[n] is slack.
  static void to_value_pairs(float* x, int64_t n) {
#if defined(FVK_QNA_VALUE_PAIRS)
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
    for (int64_t p = 0; p < n; p += kW) {
      const __m512i lo = _mm512_castps_si512(vload(x + p));
      const __m512i hi = _mm512_castps_si512(vload(x + p + 1));
      const __m512i pair = _mm512_or_si512(_mm512_and_si512(hi, high), _mm512_srli_epi32(lo, 16));
      vstore(x + p, _mm512_castsi512_ps(pair));
    }
#else
    (void)x, (void)n;
#endif
  }

  // The raw scores, for the windows that take the direct path (rare).
  const float* raw_scores(const QnaAttentionInputs& a, const Planes& g) {
    if (!raw_ready) {
      switch (a.dtype) {
        case ElemType::kFloat32: pack_raw<ElemType::kFloat32>(a, g); break;
        case ElemType::kBFloat16: pack_raw<ElemType::kBFloat16>(a, g); break;
        case ElemType::kFloat16: pack_raw<ElemType::kFloat16>(a, g); break;
      }
      raw_ready = true;
    }
    return raw;
  }

  template <ElemType T>
  void pack_raw(const QnaAttentionInputs& a, const Planes& g) {
    pack_input_planes<T>(a.cost, a.cost_stride, b, a.Hi, a.Q, a.H, g, y_first,
                         -std::numeric_limits<float>::infinity(), staging, raw);
  }
};

// Sums S_q = sum_t ec_q(t) er_t over the taps of NJ vectors at j (two chains per vector).
template <int NJ>
inline void tap_sums(const float* ecq, const int32_t* off, int64_t taps, const float* er,
                     vf* sum) {
  vf s[NJ][2];
  for (int n = 0; n < NJ; ++n) s[n][0] = s[n][1] = vzero();
  int64_t t = 0;
  for (; t + 2 <= taps; t += 2) {
    const vf e0 = vset1(er[t]), e1 = vset1(er[t + 1]);
#pragma GCC unroll 4
    for (int n = 0; n < NJ; ++n) {
      s[n][0] = vfma(vload(ecq + off[t] + n * kW), e0, s[n][0]);
      s[n][1] = vfma(vload(ecq + off[t + 1] + n * kW), e1, s[n][1]);
    }
  }
  if (t < taps)
    for (int n = 0; n < NJ; ++n) s[n][0] = vfma(vload(ecq + off[t] + n * kW), vset1(er[t]), s[n][0]);
  for (int n = 0; n < NJ; ++n) sum[n] = vadd(s[n][0], s[n][1]);
}

// The direct path of one vector (its scores far below the task's reference): exp(cost + rpe - max)
// with the vector's own max over the taps; e[t * stride] gets them (0 in invalid lanes). Returns
// the sum; *lse_ref = the max.
inline vf direct_exps(const float* rawq, const int32_t* off, int64_t taps, const float* rpe,
                      vf valid, float* e, int64_t stride, vf* max_out) {
  vf mx = vset1(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < taps; ++t) mx = vmax(vadd(vload(rawq + off[t]), vset1(rpe[t])), mx);
  vf sum = vzero();
  for (int64_t t = 0; t < taps; ++t) {
    const vf et = keep(valid, vexp(vsub(vadd(vload(rawq + off[t]), vset1(rpe[t])), mx)));
    vstore(e + t * stride, et);
    sum = vadd(sum, et);
  }
  *max_out = mx;
  return sum;
}

// ---- Forward ----

// The taps one vector of output positions loops over: [begin, end), and the runs [run_begin,
// run_end) of forward_values_runs. A tap row whose input row lies outside the image for every
// output row of the vector reads only gap (exp(cost - M) = 0 and v = 0), so leaving it out
// changes no sum: the padded positions are not part of the softmax (docs/qna_attention.md,
// "Definition"). On small images with large windows that is a good part of the taps (14 x 14
// input, stride 2, k = 11: a third of the tap rows of the first and last output rows).
struct TapSpan {
  int32_t begin, end, run_begin, run_end;
  bool operator==(const TapSpan&) const = default;
};

// The span of the kW positions from j of a task whose output rows start at oy0 (R of them): the
// tap rows ty with an input row oy * s - pad + ty inside the image for some output row oy of the
// vector (rows with a position ox < Wo in it). begin is rounded down to an even tap so that
// tap_sums pairs the taps into its two chains as over all taps: the results are those of the
// full loop, bit for bit.
inline TapSpan vector_tap_span(const QnaAttentionInputs& a, const Planes& g, int64_t oy0,
                               int64_t R, int64_t j) {
  int64_t first = j / g.P;
  if (j % g.P >= a.Wo) ++first;  // the vector starts in a row's gap
  const int64_t last = (std::min(j + kW, R * g.P) - 1) / g.P;  // j < R * P: see forward_impl
  int64_t ty_begin = 0, ty_end = g.k;
  if (first <= last) {  // else only gap lanes, never stored: any span will do
    ty_begin = std::max<int64_t>(0, g.pad - (oy0 + last) * g.s);
    ty_end = std::min<int64_t>(g.k, a.Hi + g.pad - (oy0 + first) * g.s);
  }
  const int64_t begin = ty_begin * g.k / 2 * 2;
  return {static_cast<int32_t>(begin), static_cast<int32_t>(ty_end * g.k), g.row_runs[ty_begin],
          g.row_runs[ty_end]};
}

struct FwdScratch {
  TaskPlanes in;
  float* out;  // [Cp][ostride]
  float* lse;  // [QHp][ostride]
  float* m;    // [taps][kNJ][kW]: the weight of each tap
  float* e;    // [taps][kW]: direct exps
  std::vector<TapSpan> spans;  // [olen / kW]: of each vector of the task

  int64_t carve(float* base, const QnaAttentionInputs& a, const Planes& g) {
    Carver c(base);
    in.carve(c, a, g);
    out = c.take(round_up(a.H * a.D, kW) * g.ostride);
    lse = c.take(round_up(a.Q * a.H, kW) * g.ostride);
    m = c.take(g.taps * kNJ * kW);
    e = c.take(g.taps * kW);
    return c.used();
  }
};

// A value of the v planes as fp32: with kPairs they hold value pairs (TaskPlanes::pack), whose
// low half is the value itself.
template <bool kPairs>
inline vf load_value(const float* p) {
#if defined(FVK_QNA_VALUE_PAIRS)
  if constexpr (kPairs)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(vload(p)), 16));
#endif
  return vload(p);
}

// out_d = sum_t m_t v_d(t) for DC channels from d0 of head h.
template <int NJ, int DC, bool kPairs>
inline void forward_values(const QnaAttentionInputs& a, const Planes& g, const FwdScratch& w,
                           int64_t h, int64_t d0, int64_t j, const TapSpan& span) {
  vf acc[NJ][DC];
#pragma GCC unroll 16
  for (int n = 0; n < NJ; ++n)
    for (int d = 0; d < DC; ++d) acc[n][d] = vzero();
  const float* v = w.in.v + (h * a.D + d0) * g.chs + j;
  const int64_t chs = g.chs;
  for (int64_t t = span.begin; t < span.end; ++t) {
    const float* vt = v + g.off[t];
#pragma GCC unroll 4
    for (int n = 0; n < NJ; ++n) {
      const vf mt = vload(w.m + (t * NJ + n) * kW);
#pragma GCC unroll 16
      for (int d = 0; d < DC; ++d)
        acc[n][d] = vfma(mt, load_value<kPairs>(vt + d * chs + n * kW), acc[n][d]);
    }
  }
  float* out = w.out + (h * a.D + d0) * g.ostride + j;
#pragma GCC unroll 16
  for (int n = 0; n < NJ; ++n)
    for (int d = 0; d < DC; ++d) vstore(out + d * g.ostride + n * kW, acc[n][d]);
}

// Calls f(std::integral_constant<int, n>{}) for n in 1 .. 8 (channels of a chunk, taps of a run).
static_assert(kDChunk == 8 && kMaxRun == 8);
template <class F>
inline void with_count(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Queries of a block whose tap weights are summed in registers (forward_block_fused).
constexpr int kFusedQueries = 4;

// out_d = sum_t m_t v_d(t) for the kDChunk channels from d0 of head h, with the tap weights
// m_t = sum_q exp(cost_q - M)(t) * (attn_scale exp(rpe - Rmax))_t / S_q made in registers
// (inv: 1 / S_q per query and vector) instead of a pass that stores them.
template <int NJ, int NQ>
inline void forward_values_fused(const QnaAttentionInputs& a, const Planes& g, const Tables& tab,
                                 const FwdScratch& w, int64_t h, int64_t d0, int64_t j,
                                 const vf (*inv)[NJ], const TapSpan& span) {
  vf acc[NJ][kDChunk];
#pragma GCC unroll 16
  for (int n = 0; n < NJ; ++n)
    for (int d = 0; d < kDChunk; ++d) acc[n][d] = vzero();
  const float* ec[NQ];
  const float* ers[NQ];
  for (int q = 0; q < NQ; ++q) {
    ec[q] = w.in.ec + (q * a.H + h) * g.chs + j;
    ers[q] = tab.of(tab.ers, a.Q, h, q);
  }
  const float* v = w.in.v + (h * a.D + d0) * g.chs + j;
  const int64_t chs = g.chs;
  const int32_t* off = g.off.data();
  for (int64_t t = span.begin; t < span.end; ++t) {
    const int64_t o = off[t];
    vf m[NJ];
    {
      const vf s = vset1(ers[0][t]);
#pragma GCC unroll 4
      for (int n = 0; n < NJ; ++n) m[n] = vmul(vload(ec[0] + o + n * kW), vmul(inv[0][n], s));
    }
#pragma GCC unroll 4
    for (int q = 1; q < NQ; ++q) {
      const vf s = vset1(ers[q][t]);
#pragma GCC unroll 4
      for (int n = 0; n < NJ; ++n) m[n] = vfma(vload(ec[q] + o + n * kW), vmul(inv[q][n], s), m[n]);
    }
    const float* vt = v + o;
#pragma GCC unroll 4
    for (int n = 0; n < NJ; ++n) {
#pragma GCC unroll 16
      for (int d = 0; d < kDChunk; ++d) acc[n][d] = vfma(m[n], vload(vt + d * chs + n * kW), acc[n][d]);
    }
  }
  float* out = w.out + (h * a.D + d0) * g.ostride + j;
#pragma GCC unroll 16
  for (int n = 0; n < NJ; ++n)
    for (int d = 0; d < kDChunk; ++d) vstore(out + d * g.ostride + n * kW, acc[n][d]);
}

#if defined(FVK_SIMD_AVX512)
// Lane indices of a two-source permutation: from kShift + i, the 16 lanes from lane i of the pair.
constexpr int32_t kShift[2 * kW] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                    16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};

// The weight of tap t for one vector:
// sum_q exp(cost_q - M)(t) * (attn_scale exp(rpe - Rmax))_t / S_q.
template <int NQ>
inline vf tap_weight(const float* ecq0, int64_t ec_stride, int64_t o, int32_t t,
                     const float* const* ers, const vf* inv) {
  vf m = vmul(vload(ecq0 + o), vmul(inv[0], vset1(ers[0][t])));
#pragma GCC unroll 4
  for (int q = 1; q < NQ; ++q)
    m = vfma(vload(ecq0 + q * ec_stride + o), vmul(inv[q], vset1(ers[q][t])), m);
  return m;
}

// The aligned pair (a0, a1) of each of the chunk's channels that holds a run's values from offset
// o0 on (runs never cross a second vector boundary: shift + L - 1 < kW); returns the run's lane
// shift within a0.
inline int64_t load_run(const float* v, int64_t chs, int64_t o0, vf* a0, vf* a1) {
  const int64_t shift = o0 & (kW - 1), base = o0 - shift;  // v + base is on a vector boundary
#pragma GCC unroll 8
  for (int d = 0; d < kDChunk; ++d) {
    a0[d] = _mm512_load_ps(v + d * chs + base);
    a1[d] = _mm512_load_ps(v + d * chs + base + kW);
  }
  return shift;
}

// forward_values_fused with the values of a run of L taps (consecutive offsets o, o + 1, ...)
// made from two or three aligned loads per channel and a two-source lane permutation per tap,
// instead of an unaligned load per tap (a cache-line split for 15 of 16 offsets: the loads, not
// the multiply-adds, bounded the loop). One vector (n) at a time.
template <int NQ, int L>
inline void run_values(const float* ecq0, int64_t ec_stride, const float* v, int64_t chs,
                       const int32_t* off, const int32_t* taps, const float* const* ers,
                       const vf* inv, vf* acc) {
  vf a0[kDChunk], a1[kDChunk];
  const int64_t shift = load_run(v, chs, off[taps[0]], a0, a1);
#pragma GCC unroll 8
  for (int i = 0; i < L; ++i) {
    const vf m = tap_weight<NQ>(ecq0, ec_stride, off[taps[i]], taps[i], ers, inv);
    const __m512i idx = _mm512_loadu_si512(kShift + shift + i);
#pragma GCC unroll 8
    for (int d = 0; d < kDChunk; ++d)
      acc[d] = vfma(m, _mm512_permutex2var_ps(a0[d], idx, a1[d]), acc[d]);
  }
}

#if defined(FVK_QNA_VALUE_PAIRS)
// run_values on value pairs (TaskPlanes::pack): taps i and i + 1 of the run (offsets o and o + 1)
// in one vdpbf16ps per channel, whose lane n adds m_i[n] v[o + n] + m_{i+1}[n] v[o + n + 1]: the
// pair at o + n, times the two weights rounded to bf16 and interleaved. Half the multiply
// instructions and lane permutations of run_values; a run of odd length pairs its last tap with a
// zero weight.
template <int NQ, int L>
inline void run_value_pairs(const float* ecq0, int64_t ec_stride, const float* v, int64_t chs,
                            const int32_t* off, const int32_t* taps, const float* const* ers,
                            const vf* inv, vf* acc) {
  vf a0[kDChunk], a1[kDChunk];
  const int64_t shift = load_run(v, chs, off[taps[0]], a0, a1);
  const __m512i order = pair_order();
#pragma GCC unroll 4
  for (int i = 0; i < L; i += 2) {
    const vf m0 = tap_weight<NQ>(ecq0, ec_stride, off[taps[i]], taps[i], ers, inv);
    const vf m1 = i + 1 < L
                      ? tap_weight<NQ>(ecq0, ec_stride, off[taps[i + 1]], taps[i + 1], ers, inv)
                      : vzero();
    const __m512bh m = (__m512bh)bf16_pairs(m0, m1, order);
    const __m512i idx = _mm512_loadu_si512(kShift + shift + i);
#pragma GCC unroll 8
    for (int d = 0; d < kDChunk; ++d)
      acc[d] = _mm512_dpbf16_ps(acc[d], m, (__m512bh)_mm512_permutex2var_ps(a0[d], idx, a1[d]));
  }
}
#endif

template <int NJ, int NQ, bool kPairs>
inline void forward_values_runs(const QnaAttentionInputs& a, const Planes& g, const Tables& tab,
                                const FwdScratch& w, int64_t h, int64_t d0, int64_t j,
                                const vf (*inv)[NJ], const TapSpan& span) {
  const float* ers[NQ];
  for (int q = 0; q < NQ; ++q) ers[q] = tab.of(tab.ers, a.Q, h, q);
  const int64_t chs = g.chs;
  const int32_t* off = g.off.data();
  for (int n = 0; n < NJ; ++n) {
    const int64_t jn = j + n * kW;
    vf acc[kDChunk];
#pragma GCC unroll 8
    for (int d = 0; d < kDChunk; ++d) acc[d] = vzero();
    vf inv_n[NQ];
    for (int q = 0; q < NQ; ++q) inv_n[q] = inv[q][n];
    const float* ec = w.in.ec + h * chs + jn;  // query q at + q * H * chs
    const float* v = w.in.v + (h * a.D + d0) * chs + jn;
    for (int64_t r = span.run_begin; r < span.run_end; ++r) {
      const int32_t* taps = g.run_taps.data() + g.run_first[r];
      with_count(g.run_first[r + 1] - g.run_first[r], [&](auto L) {
#if defined(FVK_QNA_VALUE_PAIRS)
        if constexpr (kPairs) {
          run_value_pairs<NQ, L>(ec, a.H * chs, v, chs, off, taps, ers, inv_n, acc);
          return;
        }
#endif
        run_values<NQ, L>(ec, a.H * chs, v, chs, off, taps, ers, inv_n, acc);
      });
    }
    float* out = w.out + (h * a.D + d0) * g.ostride + jn;
#pragma GCC unroll 8
    for (int d = 0; d < kDChunk; ++d) vstore(out + d * g.ostride, acc[d]);
  }
}
#endif

// forward_block when every vector of the block takes the factorised exponentials (the usual case)
// and Q <= kFusedQueries, D a multiple of kDChunk: the softmax sums, then the values with the tap
// weights made on the fly. Returns false, having stored nothing, when a vector needs the direct
// path.
template <int NJ, bool kPairs>
inline bool forward_block_fused(const QnaAttentionInputs& a, const Planes& g, const Tables& tab,
                                FwdScratch& w, int64_t h, int64_t j, const TapSpan& span) {
  const int64_t Q = a.Q, H = a.H;
  vf inv[kFusedQueries][NJ], sum[kFusedQueries][NJ];
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t c = q * H + h;
    tap_sums<NJ>(w.in.ec + c * g.chs + j, g.off.data() + span.begin, span.end - span.begin,
                 tab.of(tab.er, Q, h, q) + span.begin, sum[q]);
    for (int n = 0; n < NJ; ++n) {
      inv[q][n] = vdiv(vset1(1.0f), sum[q][n]);
      if (!vall_le(keep(vload(w.in.valid + j + n * kW), inv[q][n]), kMaxReferenceScale)) return false;
    }
  }
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t c = q * H + h;
    const vf ref = vset1(w.in.cost_max[c] + tab.rmax[h * Q + q]);
    for (int n = 0; n < NJ; ++n)
      vstore(w.lse + c * g.ostride + j + n * kW, vadd(ref, vlog(sum[q][n])));
  }
  const auto values = [&](auto nq) {
    for (int64_t d0 = 0; d0 < a.D; d0 += kDChunk) {
#if defined(FVK_SIMD_AVX512)
      if (g.use_runs) {
        forward_values_runs<NJ, decltype(nq)::value, kPairs>(a, g, tab, w, h, d0, j, inv, span);
        continue;
      }
#endif
      forward_values_fused<NJ, decltype(nq)::value>(a, g, tab, w, h, d0, j, inv, span);
    }
  };
  switch (Q) {
    case 1: values(std::integral_constant<int, 1>{}); break;
    case 2: values(std::integral_constant<int, 2>{}); break;
    case 3: values(std::integral_constant<int, 3>{}); break;
    default: values(std::integral_constant<int, 4>{}); break;
  }
  return true;
}

// One block (NJ vectors at output position j) of head h, over the taps of span (the same for
// every vector of the block).
template <int NJ, bool kPairs>
inline void forward_block(const QnaAttentionInputs& a, const Planes& g, const Tables& tab,
                          FwdScratch& w, int64_t h, int64_t j, const TapSpan& span) {
  if (a.Q <= kFusedQueries && a.D % kDChunk == 0 &&
      forward_block_fused<NJ, kPairs>(a, g, tab, w, h, j, span))
    return;
  const int64_t t0 = span.begin, taps = span.end - span.begin, Q = a.Q, H = a.H;
  const int32_t* off = g.off.data();
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t c = q * H + h;
    const float* ecq = w.in.ec + c * g.chs + j;
    const float* ers = tab.of(tab.ers, Q, h, q);
    vf sum[NJ], inv[NJ];
    bool direct[NJ], any_direct = false;
    tap_sums<NJ>(ecq, off + t0, taps, tab.of(tab.er, Q, h, q) + t0, sum);
    const vf ref = vset1(w.in.cost_max[c] + tab.rmax[h * Q + q]);
    for (int n = 0; n < NJ; ++n) {
      const vf valid = vload(w.in.valid + j + n * kW);
      inv[n] = vdiv(vset1(1.0f), sum[n]);
      direct[n] = !vall_le(keep(valid, inv[n]), kMaxReferenceScale);
      any_direct |= direct[n];
      if (!direct[n]) vstore(w.lse + c * g.ostride + j + n * kW, vadd(ref, vlog(sum[n])));
    }
    if (!any_direct) {
      for (int64_t t = t0; t < span.end; ++t) {
        const vf s = vset1(ers[t]);
#pragma GCC unroll 4
        for (int n = 0; n < NJ; ++n) {
          float* m = w.m + (t * NJ + n) * kW;
          const vf wt = vmul(vload(ecq + off[t] + n * kW), vmul(inv[n], s));
          vstore(m, q == 0 ? wt : vadd(vload(m), wt));
        }
      }
      continue;
    }
    const float* scale = tab.of(tab.scale, Q, h, q);
    for (int n = 0; n < NJ; ++n) {
      const vf valid = vload(w.in.valid + j + n * kW);
      const float* e = ecq + n * kW;
      int64_t e_stride = 0;  // taps read from the planes (offsets) or from w.e
      vf c_inv = inv[n];
      const float* er_or_one = ers;
      if (direct[n]) {
        vf mx;
        const vf s = direct_exps(w.in.raw_scores(a, g) + c * g.chs + j + n * kW, off + t0, taps,
                                 tab.of(tab.rpe, Q, h, q) + t0, valid, w.e, kW, &mx);
        c_inv = keep(valid, vdiv(vset1(1.0f), s));
        vstore(w.lse + c * g.ostride + j + n * kW, vadd(mx, vlog(s)));
        e = w.e;  // tap t at (t - t0) * kW
        e_stride = kW;
        er_or_one = scale;
      }
      for (int64_t t = t0; t < span.end; ++t) {
        float* m = w.m + (t * NJ + n) * kW;
        const vf et = vload(e_stride != 0 ? e + (t - t0) * e_stride : e + off[t]);
        const vf wt = vmul(et, vmul(c_inv, vset1(er_or_one[t])));
        vstore(m, q == 0 ? wt : vadd(vload(m), wt));
      }
    }
  }
  for (int64_t d0 = 0; d0 < a.D; d0 += kDChunk)
    with_count(std::min<int64_t>(kDChunk, a.D - d0),
               [&](auto dc) { forward_values<NJ, dc, kPairs>(a, g, w, h, d0, j, span); });
}

template <ElemType T>
inline void forward_impl(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const Planes g(a, a.tasks.rows_per_task);
  const Tables tab(a);
  FwdScratch w{};
  const AlignedBuffer mem(w.carve(nullptr, a, g), /*zeroed=*/true);
  w.carve(mem.data(), a, g);
  const int64_t QH = a.Q * a.H, C = a.H * a.D;
  // bf16 values by tap pairs (run_value_pairs) where blocks are fused and the values go by runs
  // (isa/bf16_kernels.inc sends only the calls it pays for here: stride 1).
  bool pairs = false;
#if defined(FVK_QNA_VALUE_PAIRS)
  pairs = T == ElemType::kBFloat16 && g.use_runs && a.Q <= kFusedQueries && a.D % kDChunk == 0;
#endif
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy0 = task % a.tasks.tasks_per_image * g.R;
    const int64_t R = std::min(a.Ho - oy0, g.R);
    w.in.pack<T>(a, g, b, oy0, R, pairs);
    const int64_t positions = round_up(R * g.P, kW);
    w.spans.resize(positions / kW);
    for (int64_t i = 0; i < positions / kW; ++i) w.spans[i] = vector_tap_span(a, g, oy0, R, i * kW);
    const bool next = task + 1 < task_end;
    const int64_t next_b = (task + 1) / a.tasks.tasks_per_image;
    const int64_t next_oy0 = (task + 1) % a.tasks.tasks_per_image * g.R;
    const auto heads = [&](auto pairs_c) {
      constexpr bool kPairs = decltype(pairs_c)::value;
      for (int64_t h = 0; h < a.H; ++h) {
        if (next)
          prefetch_task_part(a, sizeof(typename Elem<T>::type), next_b, next_oy0,
                             std::min(a.Ho - next_oy0, g.R), h, a.H);
        // Blocks of kNJ vectors; a last vector of its own when R * P ends in the first half. The
        // vectors of a block with different spans go one by one, each over its own taps.
        static_assert(kNJ == 2);
        int64_t j = 0;
        for (; j + kNJ * kW <= positions; j += kNJ * kW) {
          const TapSpan& s0 = w.spans[j / kW];
          const TapSpan& s1 = w.spans[j / kW + 1];
          if (s0 == s1) {
            forward_block<kNJ, kPairs>(a, g, tab, w, h, j, s0);
          } else {
            forward_block<1, kPairs>(a, g, tab, w, h, j, s0);
            forward_block<1, kPairs>(a, g, tab, w, h, j + kW, s1);
          }
        }
        if (j < positions) forward_block<1, kPairs>(a, g, tab, w, h, j, w.spans[j / kW]);
      }
    };
    if (pairs)
      heads(std::true_type{});
    else
      heads(std::false_type{});
    const int64_t first = (b * a.Ho + oy0) * a.Wo;
    unpack_output_planes<T>(w.out, C, g, R, a.Wo, w.in.staging, a.out, first * C);
    unpack_output_planes<ElemType::kFloat32>(w.lse, QH, g, R, a.Wo, w.in.staging, a.lse,
                                             first * QH);
  }
}

// ---- Backward ----

struct BwdScratch {
  TaskPlanes in;
  float* grad;     // [Cp][ostride] grad_out
  float* dcost;    // [QHp][chs]
  float* dv;       // [Cp][chs]
  float* w;        // [Q][taps][kNJ][kW]: exp(s - ref), then the weights
  float* u;        // [taps][kNJ][kW]
  float* m;        // [taps][kNJ][kW]: sum_q w a
  float* stats;    // [Q][3][kNJ][kW]: 1 / sum, sum of the weights, -delta
  float* drpe;     // [taps][Q][kW]: the head's partial sums over the task
  float* dscale;   // [taps][Q][kW]

  int64_t carve(float* base, const QnaAttentionInputs& a, const Planes& g) {
    Carver c(base);
    in.carve(c, a, g);
    const int64_t QHp = round_up(a.Q * a.H, kW), Cp = round_up(a.H * a.D, kW);
    grad = c.take(Cp * g.ostride);
    // Garbage lanes add zeros up to a block past a channel's planes.
    const int64_t slack = (kNJ + 1) * kW + g.max_shift + g.P;
    dcost = c.take(QHp * g.chs + slack);
    dv = c.take(Cp * g.chs + slack);
    w = c.take(a.Q * g.taps * kNJ * kW);
    u = c.take(g.taps * kNJ * kW);
    m = c.take(g.taps * kNJ * kW);
    stats = c.take(a.Q * 3 * kNJ * kW);
    drpe = c.take(g.taps * a.Q * kW);
    dscale = c.take(g.taps * a.Q * kW);
    return c.used();
  }
};

// u_t = sum_d g_d v_d(t) over DC channels from d0 (added to u unless d0 == 0).
template <int DC>
inline void backward_dots(const QnaAttentionInputs& a, const Planes& g, const BwdScratch& w,
                          int64_t h, int64_t d0, int64_t j) {
  vf gd[kNJ][DC];
  const float* grad = w.grad + (h * a.D + d0) * g.ostride + j;
#pragma GCC unroll 16
  for (int n = 0; n < kNJ; ++n)
    for (int d = 0; d < DC; ++d) gd[n][d] = vload(grad + d * g.ostride + n * kW);
  const float* v = w.in.v + (h * a.D + d0) * g.chs + j;
  const int64_t chs = g.chs;
  for (int64_t t = 0; t < g.taps; ++t) {
    const float* vt = v + g.off[t];
#pragma GCC unroll 4
    for (int n = 0; n < kNJ; ++n) {
      float* u = w.u + (t * kNJ + n) * kW;
      vf even = d0 == 0 ? vzero() : vload(u), odd = vzero();
#pragma GCC unroll 16
      for (int d = 0; d < DC; ++d) {
        const vf x = vmul(gd[n][d], vload(vt + d * chs + n * kW));
        if (d % 2 == 0) even = vadd(even, x); else odd = vadd(odd, x);
      }
      vstore(u, vadd(even, odd));
    }
  }
}

// dv_d(t) += m_t g_d over DC channels from d0, taps in scatter order.
template <int DC>
inline void backward_dv(const QnaAttentionInputs& a, const Planes& g, const BwdScratch& w,
                        int64_t h, int64_t d0, int64_t j) {
  vf gd[kNJ][DC];
  const float* grad = w.grad + (h * a.D + d0) * g.ostride + j;
#pragma GCC unroll 16
  for (int n = 0; n < kNJ; ++n)
    for (int d = 0; d < DC; ++d) gd[n][d] = vload(grad + d * g.ostride + n * kW);
  float* dv = w.dv + (h * a.D + d0) * g.chs + j;
  const int64_t chs = g.chs;
  for (int64_t i = 0; i < g.taps; ++i) {
    const int64_t t = g.scatter[i];
    float* dvt = dv + g.off[t];
#pragma GCC unroll 4
    for (int n = 0; n < kNJ; ++n) {
      const vf mt = vload(w.m + (t * kNJ + n) * kW);
#pragma GCC unroll 16
      for (int d = 0; d < DC; ++d) {
        float* p = dvt + d * chs + n * kW;
        vstore(p, vfma(mt, gd[n][d], vload(p)));
      }
    }
  }
}

inline void backward_block(const QnaAttentionInputs& a, const Planes& g, const Tables& tab,
                           BwdScratch& w, int64_t h, int64_t j) {
  const int64_t taps = g.taps, Q = a.Q, H = a.H;
  const int32_t* off = g.off.data();
  constexpr int64_t kBlock = kNJ * kW;
  // exp(s - ref) of every tap, the sums, 1 / sum (0 in invalid lanes) and the weight sum.
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t c = q * H + h;
    const float* ecq = w.in.ec + c * g.chs + j;
    const float* er = tab.of(tab.er, Q, h, q);
    float* e = w.w + q * taps * kBlock;
    vf s[kNJ][2];
    for (int n = 0; n < kNJ; ++n) s[n][0] = s[n][1] = vzero();
    for (int64_t t = 0; t < taps; ++t) {
      const vf ert = vset1(er[t]);
#pragma GCC unroll 4
      for (int n = 0; n < kNJ; ++n) {
        const vf et = vmul(vload(ecq + off[t] + n * kW), ert);
        vstore(e + t * kBlock + n * kW, et);
        s[n][t & 1] = vadd(s[n][t & 1], et);
      }
    }
    float* stats = w.stats + q * 3 * kBlock;
    for (int n = 0; n < kNJ; ++n) {
      const vf valid = vload(w.in.valid + j + n * kW);
      vf sum = vadd(s[n][0], s[n][1]);
      vf inv = keep(valid, vdiv(vset1(1.0f), sum));
      if (!vall_le(inv, kMaxReferenceScale)) {
        vf mx;
        sum = direct_exps(w.in.raw_scores(a, g) + c * g.chs + j + n * kW, off, taps, tab.of(tab.rpe, Q, h, q),
                          valid, e + n * kW, kBlock, &mx);
        inv = keep(valid, vdiv(vset1(1.0f), sum));
      }
      vstore(stats + n * kW, inv);
      vstore(stats + kBlock + n * kW, vmul(sum, inv));
    }
  }
  // u_t = g . v_t.
  for (int64_t d0 = 0; d0 < a.D; d0 += kDChunk)
    with_count(std::min<int64_t>(kDChunk, a.D - d0),
               [&](auto dc) { backward_dots<dc>(a, g, w, h, d0, j); });
  // The weights, delta_q = sum_t w a u and the dattn_scale terms w u.
  for (int64_t q = 0; q < Q; ++q) {
    const float* scale = tab.of(tab.scale, Q, h, q);
    float* e = w.w + q * taps * kBlock;
    float* stats = w.stats + q * 3 * kBlock;
    vf inv[kNJ], delta[kNJ][2];
    for (int n = 0; n < kNJ; ++n) {
      inv[n] = vload(stats + n * kW);
      delta[n][0] = delta[n][1] = vzero();
    }
    for (int64_t t = 0; t < taps; ++t) {
      const vf at = vset1(scale[t]);
      vf wu_sum = vzero();
#pragma GCC unroll 4
      for (int n = 0; n < kNJ; ++n) {
        const vf wt = vmul(vload(e + t * kBlock + n * kW), inv[n]);
        vstore(e + t * kBlock + n * kW, wt);
        const vf wu = vmul(wt, vload(w.u + t * kBlock + n * kW));
        wu_sum = vadd(wu_sum, wu);
        delta[n][t & 1] = vfma(wu, at, delta[n][t & 1]);
      }
      float* ds = w.dscale + (t * Q + q) * kW;
      vstore(ds, vadd(vload(ds), wu_sum));
    }
    for (int n = 0; n < kNJ; ++n)
      vstore(stats + 2 * kBlock + n * kW, vsub(vzero(), vadd(delta[n][0], delta[n][1])));
  }
  // ds = w (a u W - delta), scattered to dcost; drpe; m_t = sum_q w a.
  for (int64_t i = 0; i < taps; ++i) {
    const int64_t t = g.scatter[i];
    vf m[kNJ], u[kNJ];
    for (int n = 0; n < kNJ; ++n) {
      m[n] = vzero();
      u[n] = vload(w.u + t * kBlock + n * kW);
    }
    for (int64_t q = 0; q < Q; ++q) {
      const vf at = vset1(tab.of(tab.scale, Q, h, q)[t]);
      const float* e = w.w + q * taps * kBlock + t * kBlock;
      const float* stats = w.stats + q * 3 * kBlock;
      float* dcost = w.dcost + (q * H + h) * g.chs + j + off[t];
      vf ds_sum = vzero();
#pragma GCC unroll 4
      for (int n = 0; n < kNJ; ++n) {
        const vf wt = vload(e + n * kW);
        // a u scaled by the rounded sum of the weights (~1): the ds of a window then sum to 0 up
        // to rounding, and a one-tap window gives 0.
        const vf uw = vmul(u[n], vload(stats + kBlock + n * kW));
        const vf ds = vmul(wt, vfma(uw, at, vload(stats + 2 * kBlock + n * kW)));
        ds_sum = vadd(ds_sum, ds);
        vstore(dcost + n * kW, vadd(vload(dcost + n * kW), ds));
        m[n] = vfma(wt, at, m[n]);
      }
      float* dr = w.drpe + (t * Q + q) * kW;
      vstore(dr, vadd(vload(dr), ds_sum));
    }
    for (int n = 0; n < kNJ; ++n) vstore(w.m + t * kBlock + n * kW, m[n]);
  }
  for (int64_t d0 = 0; d0 < a.D; d0 += kDChunk)
    with_count(std::min<int64_t>(kDChunk, a.D - d0),
               [&](auto dc) { backward_dv<dc>(a, g, w, h, d0, j); });
}

template <ElemType T>
inline void backward_rows(const QnaAttentionBwdArgs& a, const Planes& g, const Tables& tab,
                          int64_t b, int64_t oy0, float* partial, float* top_edge,
                          float* bottom_edge, BwdScratch& w, bool next, int64_t next_b,
                          int64_t next_oy0) {
  const int64_t R = std::min(a.Ho - oy0, g.R), oy_end = oy0 + R;
  const int64_t QH = a.Q * a.H, C = a.H * a.D, QHp = round_up(QH, kW), Cp = round_up(C, kW);
  const int64_t taps = g.taps;
  w.in.pack<T>(a, g, b, oy0, R);
  pack_output_planes<T>(a.grad_out, a.grad_out_stride, b, oy0, R, a.Wo, a.H, a.D, g,
                        w.in.staging, w.grad);
  std::fill(w.dcost, w.dcost + QHp * g.chs, 0.0f);
  std::fill(w.dv, w.dv + Cp * g.chs, 0.0f);
  const int64_t positions = round_up(R * g.P, kNJ * kW);
  for (int64_t h = 0; h < a.H; ++h) {
    if (next)  // (see prefetch_task_part)
      prefetch_task_part(a, sizeof(typename Elem<T>::type), next_b, next_oy0,
                         std::min(a.Ho - next_oy0, g.R), h, a.H);
    std::fill(w.drpe, w.drpe + taps * a.Q * kW, 0.0f);
    std::fill(w.dscale, w.dscale + taps * a.Q * kW, 0.0f);
    for (int64_t j = 0; j < positions; j += kNJ * kW) backward_block(a, g, tab, w, h, j);
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t q = 0; q < a.Q; ++q) {
        partial[(t * a.Q + q) * a.H + h] = vhsum(vload(w.drpe + (t * a.Q + q) * kW));
        partial[((taps + t) * a.Q + q) * a.H + h] = vhsum(vload(w.dscale + (t * a.Q + q) * kW));
      }
    }
  }
  // The input rows: to the outputs, or to the edge slots when a neighbouring task also reads
  // them (as the channel-lane backward_rows).
  int64_t y_begin, y_end, above_end, below_begin, unused;
  input_rows_read(a, oy0, oy_end, &y_begin, &y_end);
  above_end = y_begin;
  below_begin = y_end;
  if (oy0 > 0) input_rows_read(a, oy0 - 1, oy0, &unused, &above_end);
  if (oy_end < a.Ho) input_rows_read(a, oy_end, oy_end + 1, &below_begin, &unused);
  const int64_t edge_pixel = QH + C;
  // The edge slot row of input row y, or nullptr when only this task reads it.
  const auto edge_row = [&](int64_t y) -> float* {
    if (y < above_end) return top_edge + (y - y_begin) * a.Wi * edge_pixel;
    if (y >= below_begin) return bottom_edge + (y - below_begin) * a.Wi * edge_pixel;
    return nullptr;
  };
  unpack_input_planes(w.dcost, QH, g, w.in.y_first, y_begin, y_end, w.in.staging,
                      [&](int64_t y, int64_t x, const float* row) {
                        if (float* edge = edge_row(y))
                          store_row<ElemType::kFloat32>(edge, x * edge_pixel, QH, row);
                        else
                          store_row<T>(a.dcost, ((b * a.Hi + y) * a.Wi + x) * QH, QH, row);
                      });
  unpack_input_planes(w.dv, C, g, w.in.y_first, y_begin, y_end, w.in.staging,
                      [&](int64_t y, int64_t x, const float* row) {
                        if (float* edge = edge_row(y))
                          store_row<ElemType::kFloat32>(edge, x * edge_pixel + QH, C, row);
                        else
                          store_row<T>(a.dv, ((b * a.Hi + y) * a.Wi + x) * C, C, row);
                      });
  const int64_t gap_end = oy_end < a.Ho ? below_begin : a.Hi;
  for (int64_t y = y_end; y < gap_end; ++y) {
    using E = Elem<T>;
    const int64_t p = (b * a.Hi + y) * a.Wi;
    std::fill_n(static_cast<typename E::type*>(a.dcost) + p * QH, a.Wi * QH, E::from_f32(0.0f));
    std::fill_n(static_cast<typename E::type*>(a.dv) + p * C, a.Wi * C, E::from_f32(0.0f));
  }
}

template <ElemType T>
inline void backward_impl(const QnaAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  const Planes g(a, a.tasks.rows_per_task);
  const Tables tab(a);
  BwdScratch w{};
  const AlignedBuffer mem(w.carve(nullptr, a, g), /*zeroed=*/true);
  w.carve(mem.data(), a, g);
  const int64_t partial_floats = 2 * g.taps * a.Q * a.H;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy0 = task % a.tasks.tasks_per_image * g.R;
    float *top_edge, *bottom_edge;
    qna_edge_slots(a, task, &top_edge, &bottom_edge);
    backward_rows<T>(a, g, tab, b, oy0, a.param_grad_partial + task * partial_floats, top_edge,
                     bottom_edge, w, task + 1 < task_end,
                     (task + 1) / a.tasks.tasks_per_image,
                     (task + 1) % a.tasks.tasks_per_image * g.R);
    qna_image_done(a, task);
  }
}

}  // namespace pixel

// ---------------------------------------------------------------------------------------------
// Batch lanes (small images, large windows): a vector holds one output pixel of kW images
// ---------------------------------------------------------------------------------------------
//
// The pixel lanes above process every tap of every vector: a vector holds output pixels of
// different rows and columns, so a tap outside the image for some of them is inside for others,
// and only whole tap rows can be left out (vector_tap_span). On a small image with a large
// window most of the rest reads gap too (14 x 14 input, stride 2, k = 13: a 7 x 7 output row
// fills 7 of the 10 lanes of a plane row, and 41% of its (output, tap) pairs read padding). Here
// the lanes are the same output pixel of kQnaBatchLanes images (kQnaBatchLanes / kW vectors), so
// a tap is inside the image for all lanes or for none: each output loops over exactly the taps
// of its window W(o) (docs/qna_attention.md, "Definition"), and every load is a whole aligned
// vector. The math, the exponential factorisation (with M per image and channel) and its
// direct-exp fallback are those of the pixel lanes.
//
// Task: images [group * kQnaBatchLanes, ...) and heads [h0, h0 + batch_heads) of them, the whole
// image: it packs per input pixel the raw cost and v of its heads as one plane per channel,
// [channel][pixel][kQnaBatchLanes] (planes with no gaps: the windows are clipped instead), then
// runs head by head over the output pixels, and transposes its outputs back at the end.

namespace batch {

constexpr int64_t kLanes = kQnaBatchLanes;
constexpr int kDChunk = 8;         // value channels per pass over a window
using pixel::kFusedQueries;        // queries of the fused path: the pixel lanes' bound

// The window of output (oy, ox) clipped to the image: taps [ty0, ty1) x [tx0, tx1); tap (ty, tx)
// reads input pixel (y0 + ty) * Wi + x0 + tx.
struct Window {
  int64_t ty0, ty1, tx0, tx1, y0, x0;
};

inline Window clipped_window(const QnaAttentionInputs& a, int64_t oy, int64_t ox) {
  const int64_t y0 = oy * a.stride - a.pad, x0 = ox * a.stride - a.pad;
  return {std::max<int64_t>(0, -y0), std::min(a.kernel_size, a.Hi - y0),
          std::max<int64_t>(0, -x0), std::min(a.kernel_size, a.Wi - x0), y0, x0};
}

// Per-thread buffers, sized for tasks of batch_heads heads (nh <= that in a task).
struct Scratch {
  float* raw;       // [Q * heads, rounded to kW][HW][kLanes]: cost, channel q * nh + hl
  float* v;         // [D * heads, rounded][HW][kLanes]: channel hl * D + d
  float* ec;        // [Q * heads][HW][kLanes]: exp(cost - M)
  float* cost_max;  // [Q * heads][kLanes]: M
  float* out;       // [D * heads, rounded][HoWo][kLanes]
  float* lse;       // [Q * heads, rounded][HoWo][kLanes]
  float* valid;     // [kLanes]: 1 for lanes holding an image of the task
  float* staging;   // pack: [kLanes] cost rows, [kLanes] v rows, a zero row; unpack: [kLanes] rows
  float* m;         // [taps][kW]: the weight of each tap (general path)
  float* e;         // [taps][kW]: direct exps

  int64_t carve(float* base, const QnaAttentionFwdArgs& a) {
    const int64_t nh = a.batch_heads, HW = a.Hi * a.Wi, HoWo = a.Ho * a.Wo;
    const int64_t taps = a.kernel_size * a.kernel_size;
    const int64_t Fo = round_up(a.D * nh, kW), Fl = round_up(a.Q * nh, kW);
    Carver c(base);
    raw = c.take(Fl * HW * kLanes);
    v = c.take(Fo * HW * kLanes);
    ec = c.take(a.Q * nh * HW * kLanes);
    cost_max = c.take(a.Q * nh * kLanes);
    out = c.take(Fo * HoWo * kLanes);
    lse = c.take(Fl * HoWo * kLanes);
    valid = c.take(kLanes);
    staging = c.take(kLanes * (Fo + Fl) + Fo);  // pack: cost rows, v rows, a zero row
    m = c.take(taps * kW);
    e = c.take(taps * kW);
    return c.used();
  }
};

// Packs images [b0, b0 + nb), heads [h0, h0 + nh): the raw cost and v planes, M and
// exp(cost - M). Lanes past nb hold zeros (their outputs are never stored).
template <ElemType T>
inline void pack(const QnaAttentionFwdArgs& a, const Scratch& w, int64_t b0, int64_t nb,
                 int64_t h0, int64_t nh) {
  const int64_t HW = a.Hi * a.Wi, plane = HW * kLanes;
  const int64_t QC = a.Q * nh, QCp = round_up(QC, kW), VC = nh * a.D, VCp = round_up(VC, kW);
  const int64_t* cs = a.cost_stride;
  const int64_t* vs = a.v_stride;
  // fp32 v with dense [h, d] goes straight from the tensor (missing images from a zero row).
  const bool dense_v = T == ElemType::kFloat32 && vs[4] == 1 && vs[3] == a.D && VC % kW == 0;
  float* cost_rows = w.staging;              // [kLanes][QCp]
  float* v_rows = w.staging + kLanes * QCp;  // [kLanes][VCp] (unless dense_v)
  const float* zero_row = v_rows + kLanes * VCp;
  std::fill(w.staging, w.staging + kLanes * (QCp + VCp) + VCp, 0.0f);
  // Element offsets of the task's first head at pixel (0, 0) of each image; pixel (y, x) adds
  // y * st[1] + x * st[2].
  int64_t cost_base[kLanes], v_base[kLanes];
  for (int64_t i = 0; i < nb; ++i) {
    cost_base[i] = (b0 + i) * cs[0] + h0 * cs[4];
    v_base[i] = (b0 + i) * vs[0] + h0 * vs[3];
  }
  for (int64_t p = 0, y = 0, x = 0; p < HW; ++p) {
    const int64_t cp = y * cs[1] + x * cs[2], vp = y * vs[1] + x * vs[2];
    if (++x == a.Wi) x = 0, ++y;
    for (int64_t i = 0; i < nb; ++i) {
      for (int64_t q = 0; q < a.Q; ++q)
        load_row<T>(a.cost, cost_base[i] + cp + q * cs[3], cs[4], nh, cost_rows + i * QCp + q * nh);
      if (!dense_v) load_block<T>(a.v, v_base[i] + vp, vs[3], vs[4], nh, a.D, v_rows + i * VCp);
    }
    for (int64_t i0 = 0; i0 < kLanes; i0 += kW) {
      for (int64_t c0 = 0; c0 < QCp; c0 += kW)
        transpose_block(cost_rows + i0 * QCp + c0, QCp, w.raw + c0 * plane + p * kLanes + i0,
                        plane);
      if (dense_v) {
        const float* v = static_cast<const float*>(a.v);
        for (int64_t c0 = 0; c0 < VCp; c0 += kW)
          transpose_rows(
              [&](int r) { return i0 + r < nb ? v + v_base[i0 + r] + vp + c0 : zero_row; },
              w.v + c0 * plane + p * kLanes + i0, plane);
      } else {
        for (int64_t c0 = 0; c0 < VCp; c0 += kW)
          transpose_block(v_rows + i0 * VCp + c0, VCp, w.v + c0 * plane + p * kLanes + i0, plane);
      }
    }
  }
  for (int64_t c = 0; c < QC; ++c) {
    const float* raw = w.raw + c * plane;
    float* e = w.ec + c * plane;
    for (int64_t l = 0; l < kLanes; l += kW) {
      vf mx = vset1(-std::numeric_limits<float>::infinity());
      for (int64_t p = 0; p < HW; ++p) mx = vmax(vload(raw + p * kLanes + l), mx);
      vstore(w.cost_max + c * kLanes + l, mx);
      for (int64_t p = 0; p < HW; ++p)
        vstore(e + p * kLanes + l, vexp(vsub(vload(raw + p * kLanes + l), mx)));
    }
  }
  for (int64_t i = 0; i < kLanes; ++i) w.valid[i] = i < nb ? 1.0f : 0.0f;
}

// Sums S_q = sum_t exp(cost_q - M)(t) exp(rpe - Rmax)_t over the window for NQ queries (ec[q]:
// query q's plane at the vector's lanes), two chains per query.
template <int NQ>
inline void window_sums(const QnaAttentionInputs& a, const Window& win, const float* const* ec,
                        const float* const* er, vf* sum) {
  vf s0[NQ], s1[NQ];
  for (int q = 0; q < NQ; ++q) s0[q] = s1[q] = vzero();
  const int64_t k = a.kernel_size;
  for (int64_t ty = win.ty0; ty < win.ty1; ++ty) {
    const int64_t row = ((win.y0 + ty) * a.Wi + win.x0) * kLanes, t_row = ty * k;
    int64_t tx = win.tx0;
    for (; tx + 2 <= win.tx1; tx += 2) {
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) {
        s0[q] = vfma(vload(ec[q] + row + tx * kLanes), vset1(er[q][t_row + tx]), s0[q]);
        s1[q] = vfma(vload(ec[q] + row + (tx + 1) * kLanes), vset1(er[q][t_row + tx + 1]), s1[q]);
      }
    }
    if (tx < win.tx1)
      for (int q = 0; q < NQ; ++q)
        s0[q] = vfma(vload(ec[q] + row + tx * kLanes), vset1(er[q][t_row + tx]), s0[q]);
  }
  for (int q = 0; q < NQ; ++q) sum[q] = vadd(s0[q], s1[q]);
}

// out_d = sum_t m_t v_d(t) over the window for kDChunk channels (v: channel d0's plane at the
// vector's lanes), with m_t = sum_q exp(cost_q - M)(t) (attn_scale exp(rpe - Rmax))_t / S_q made
// in registers.
template <int NQ>
inline void window_values_fused(const QnaAttentionInputs& a, const Window& win,
                                const float* const* ec, const float* const* ers, const vf* inv,
                                const float* v, int64_t plane, vf* acc) {
  const int64_t k = a.kernel_size;
  for (int d = 0; d < kDChunk; ++d) acc[d] = vzero();
  for (int64_t ty = win.ty0; ty < win.ty1; ++ty) {
    const int64_t row = ((win.y0 + ty) * a.Wi + win.x0) * kLanes, t_row = ty * k;
    for (int64_t tx = win.tx0; tx < win.tx1; ++tx) {
      const int64_t o = row + tx * kLanes, t = t_row + tx;
      vf m = vmul(vload(ec[0] + o), vmul(inv[0], vset1(ers[0][t])));
#pragma GCC unroll 4
      for (int q = 1; q < NQ; ++q) m = vfma(vload(ec[q] + o), vmul(inv[q], vset1(ers[q][t])), m);
#pragma GCC unroll 8
      for (int d = 0; d < kDChunk; ++d) acc[d] = vfma(m, vload(v + d * plane + o), acc[d]);
    }
  }
}

// One output pixel o of head hl (of nh) for the kW images at lane l: its lse and out planes.
// Returns false, having stored nothing, when a query's window takes the direct path.
template <int NQ>
inline bool output_fused(const QnaAttentionFwdArgs& a, const pixel::Tables& tab, const Scratch& w,
                         const Window& win, int64_t h0, int64_t nh, int64_t hl, int64_t o,
                         int64_t l) {
  const int64_t plane = a.Hi * a.Wi * kLanes, oplane = a.Ho * a.Wo * kLanes;
  const vf valid = vload(w.valid + l);
  const float* ec[NQ];
  const float* er[NQ];
  const float* ers[NQ];
  for (int q = 0; q < NQ; ++q) {
    ec[q] = w.ec + (q * nh + hl) * plane + l;
    er[q] = tab.of(tab.er, a.Q, h0 + hl, q);
    ers[q] = tab.of(tab.ers, a.Q, h0 + hl, q);
  }
  vf sum[NQ], inv[NQ];
  window_sums<NQ>(a, win, ec, er, sum);
  for (int q = 0; q < NQ; ++q) {
    inv[q] = vdiv(vset1(1.0f), sum[q]);
    if (!vall_le(pixel::keep(valid, inv[q]), kMaxReferenceScale)) return false;
  }
  for (int q = 0; q < NQ; ++q) {
    const int64_t c = q * nh + hl;
    const vf ref = vadd(vload(w.cost_max + c * kLanes + l), vset1(tab.rmax[(h0 + hl) * a.Q + q]));
    vstore(w.lse + c * oplane + o * kLanes + l, vadd(ref, vlog(sum[q])));
  }
  const float* v = w.v + hl * a.D * plane + l;
  for (int64_t d0 = 0; d0 < a.D; d0 += kDChunk) {
    vf acc[kDChunk];
    window_values_fused<NQ>(a, win, ec, ers, inv, v + d0 * plane, plane, acc);
    float* out = w.out + (hl * a.D + d0) * oplane + o * kLanes + l;
    for (int d = 0; d < kDChunk; ++d) vstore(out + d * oplane, acc[d]);
  }
  return true;
}

// The general path of one output (any Q and D, and windows on the direct path): the tap weights
// summed over the queries into w.m, then the values.
inline void output_general(const QnaAttentionFwdArgs& a, const pixel::Tables& tab,
                           const Scratch& w, const Window& win, int64_t h0, int64_t nh,
                           int64_t hl, int64_t o, int64_t l) {
  const int64_t plane = a.Hi * a.Wi * kLanes, oplane = a.Ho * a.Wo * kLanes, k = a.kernel_size;
  const vf valid = vload(w.valid + l);
  const auto each_tap = [&](auto&& f) {  // f(t, i, pixel offset): i counts the window's taps
    int64_t i = 0;
    for (int64_t ty = win.ty0; ty < win.ty1; ++ty)
      for (int64_t tx = win.tx0; tx < win.tx1; ++tx, ++i)
        f(ty * k + tx, i, ((win.y0 + ty) * a.Wi + win.x0 + tx) * kLanes);
  };
  for (int64_t q = 0; q < a.Q; ++q) {
    const int64_t c = q * nh + hl, h = h0 + hl;
    const float* ecq = w.ec + c * plane + l;
    const float* er = tab.of(tab.er, a.Q, h, q);
    const float* ers = tab.of(tab.ers, a.Q, h, q);
    vf sum = vzero();
    each_tap([&](int64_t t, int64_t, int64_t p) { sum = vfma(vload(ecq + p), vset1(er[t]), sum); });
    vf inv = vdiv(vset1(1.0f), sum);
    float* lse = w.lse + c * oplane + o * kLanes + l;
    if (vall_le(pixel::keep(valid, inv), kMaxReferenceScale)) {
      const vf ref = vadd(vload(w.cost_max + c * kLanes + l), vset1(tab.rmax[h * a.Q + q]));
      vstore(lse, vadd(ref, vlog(sum)));
      each_tap([&](int64_t t, int64_t i, int64_t p) {
        const vf wt = vmul(vload(ecq + p), vmul(inv, vset1(ers[t])));
        vstore(w.m + i * kW, q == 0 ? wt : vadd(vload(w.m + i * kW), wt));
      });
      continue;
    }
    // Direct exponentials with the window's own max (per lane).
    const float* raw = w.raw + c * plane + l;
    const float* rpe = tab.of(tab.rpe, a.Q, h, q);
    const float* scale = tab.of(tab.scale, a.Q, h, q);
    vf mx = vset1(-std::numeric_limits<float>::infinity());
    each_tap([&](int64_t t, int64_t, int64_t p) { mx = vmax(vadd(vload(raw + p), vset1(rpe[t])), mx); });
    sum = vzero();
    each_tap([&](int64_t t, int64_t i, int64_t p) {
      const vf et = pixel::keep(valid, vexp(vsub(vadd(vload(raw + p), vset1(rpe[t])), mx)));
      vstore(w.e + i * kW, et);
      sum = vadd(sum, et);
    });
    inv = pixel::keep(valid, vdiv(vset1(1.0f), sum));
    vstore(lse, vadd(mx, vlog(sum)));
    each_tap([&](int64_t t, int64_t i, int64_t) {
      const vf wt = vmul(vload(w.e + i * kW), vmul(inv, vset1(scale[t])));
      vstore(w.m + i * kW, q == 0 ? wt : vadd(vload(w.m + i * kW), wt));
    });
  }
  const float* v = w.v + hl * a.D * plane + l;
  float* out = w.out + hl * a.D * oplane + o * kLanes + l;
  for (int64_t d = 0; d < a.D; ++d) {
    vf acc = vzero();
    const float* vd = v + d * plane;
    each_tap([&](int64_t, int64_t i, int64_t p) { acc = vfma(vload(w.m + i * kW), vload(vd + p), acc); });
    vstore(out + d * oplane, acc);
  }
}

// The task's out and lse planes to the tensors (images [b0, b0 + nb), heads [h0, h0 + nh)).
template <ElemType T>
inline void unpack(const QnaAttentionFwdArgs& a, const Scratch& w, int64_t b0, int64_t nb,
                   int64_t h0, int64_t nh) {
  const int64_t HoWo = a.Ho * a.Wo, oplane = HoWo * kLanes, C = a.H * a.D;
  const int64_t Co = nh * a.D, Cop = round_up(Co, kW), Ql = a.Q * nh, Qlp = round_up(Ql, kW);
  for (int64_t o = 0; o < HoWo; ++o) {
    for (int64_t i0 = 0; i0 < kLanes; i0 += kW)
      for (int64_t c0 = 0; c0 < Cop; c0 += kW)
        transpose_block(w.out + c0 * oplane + o * kLanes + i0, oplane, w.staging + i0 * Cop + c0,
                        Cop);
    for (int64_t i = 0; i < nb; ++i)
      store_row<T>(a.out, ((b0 + i) * HoWo + o) * C + h0 * a.D, Co, w.staging + i * Cop);
    for (int64_t i0 = 0; i0 < kLanes; i0 += kW)
      for (int64_t c0 = 0; c0 < Qlp; c0 += kW)
        transpose_block(w.lse + c0 * oplane + o * kLanes + i0, oplane, w.staging + i0 * Qlp + c0,
                        Qlp);
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t q = 0; q < a.Q; ++q)
        store_row<ElemType::kFloat32>(a.lse, (((b0 + i) * HoWo + o) * a.Q + q) * a.H + h0, nh,
                                      w.staging + i * Qlp + q * nh);
  }
}

template <ElemType T>
inline void forward_impl(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  const pixel::Tables tab(a);
  Scratch w{};
  const AlignedBuffer mem(w.carve(nullptr, a), /*zeroed=*/true);
  w.carve(mem.data(), a);
  const int64_t head_blocks = (a.H + a.batch_heads - 1) / a.batch_heads;
  const bool fused = a.Q <= kFusedQueries && a.D % kDChunk == 0;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b0 = task / head_blocks * kLanes, nb = std::min(kLanes, a.B - b0);
    const int64_t h0 = task % head_blocks * a.batch_heads, nh = std::min(a.batch_heads, a.H - h0);
    pack<T>(a, w, b0, nb, h0, nh);
    for (int64_t l = 0; l < nb; l += kW) {
      for (int64_t hl = 0; hl < nh; ++hl) {
        for (int64_t oy = 0; oy < a.Ho; ++oy) {
          for (int64_t ox = 0; ox < a.Wo; ++ox) {
            const Window win = clipped_window(a, oy, ox);
            const int64_t o = oy * a.Wo + ox;
            bool done = false;
            if (fused) {
              switch (a.Q) {
                case 1: done = output_fused<1>(a, tab, w, win, h0, nh, hl, o, l); break;
                case 2: done = output_fused<2>(a, tab, w, win, h0, nh, hl, o, l); break;
                case 3: done = output_fused<3>(a, tab, w, win, h0, nh, hl, o, l); break;
                default: done = output_fused<4>(a, tab, w, win, h0, nh, hl, o, l); break;
              }
            }
            if (!done) output_general(a, tab, w, win, h0, nh, hl, o, l);
          }
        }
      }
    }
    unpack<T>(a, w, b0, nb, h0, nh);
  }
}

}  // namespace batch

#if defined(FVK_QNA_VALUE_PAIRS)
// ---------------------------------------------------------------------------------------------
// Channel pairs (bf16 at the avx512bf16 level): a vector holds one query's channels of 16 / D heads
// ---------------------------------------------------------------------------------------------
//
// The exponential factorisation splits a tap's weight into a part of the input pixel and a part
// of the tap: exp(cost_q - M)(p_t) * (attn_scale exp(rpe - Rmax))_t / S_q. So the forward is
//   out[o, h, d] = sum_q (1 / S_q[o]) sum_t ers_q[t] u_qd[p_t],  u_qd = exp(cost_q - M) v_d,
//   S_q[o] = sum_t er_q[t] exp(cost_q - M)(p_t),
// a depthwise convolution of u (Q*D channels per head) with fixed per-tap weights, followed by a
// per-pixel normalisation (docs/qna_attention.md, "Backends"). A vector holds the (h, d) lanes of
// one query for a head vector (2 heads of D = 8, or 1 of D = 16; adjacent in v and out), so a
// tap's weights are a constant vector per (tap, head vector, query), its values one aligned load,
// and the queries' normalised sums add up lane for lane into one plain store. Two taps go into
// one vdpbf16ps: a ring row holds at pair c the bf16 pair u[2c] | u[2c + 1] << 16 of every lane
// (each plane column once); an output column whose window starts at an even plane column weighs
// the pairs with ers[t] | ers[t + 1] << 16, one that starts at an odd column with ers[t - 1] |
// ers[t] << 16 (a tap outside the row is 0). Rounding: u and ers to bf16 (the pixel-lane pairs
// round the per-pixel weight instead); sums in fp32; S in fp32 (fp32 multiply-adds over
// exp(cost - M) in (q, h) lanes), so lse is that of the other paths.
//
// A task (image b, output rows [oy0, oy0 + R)) packs exp(cost - M) of its input rows once, every
// (q, h) in fp32 (M the max over the task's pixels, as in the pixel lanes), zero outside the
// image; then S, lse and 1 / S of every output pixel. Then per group of head vectors (all of them
// where the ring fits kRingBytes), output row by output row: the pair rows of u the row reads that
// a ring of the last k plane rows does not hold yet, then the row's sums, normalised and stored.
// A task with a window whose reference sits too far above its scores (kMaxReferenceScale) is left
// to the fallback kernel whole.

namespace channel_pairs {

// The shapes this kernel takes: a head vector fills 16 lanes (D = 16, or an even number of heads
// of D = 8); up to 4 queries; odd windows up to 13 at strides 1 and 2 (each (k, stride) is an
// instantiation of the inner loops).
inline bool fits(const QnaAttentionInputs& a) {
  return (a.D == 16 || (a.D == 8 && a.H % 2 == 0)) && a.Q <= 4 && a.kernel_size % 2 == 1 &&
         a.kernel_size >= 3 && a.kernel_size <= 13 && (a.stride == 1 || a.stride == 2);
}

// Output pixels of a row summed at once (independent dot-product chains): blocks of 8, and one of
// 6 or 4 at a row's end. Blocks start at even columns (the pairs of plane columns start at even
// ones); a row is padded to a width those blocks cover (the extra pixels are computed, never
// stored). At stride 2, Wo = 14 runs 8 + 6 pixels (measured 5-9% faster than 8 + 4 + 4 at
// 28 x 28 -> 14 x 14, k = 5 and 7); at stride 1 the row is padded to a multiple of 4 (8 + 6 was
// 6-8% slower at 14 x 14, k = 7).
constexpr int kPixels = 8;

inline int64_t padded_width(int64_t Wo, int64_t stride) {
  if (stride == 1) return round_up(Wo, 4);
  const int64_t even = round_up(Wo, 2);
  return even % kPixels == 2 ? even + 2 : even;  // a tail of 2 runs as one of 4
}

// Calls f(std::integral_constant<int, n>{}, ox) for the blocks of n output pixels from ox that
// cover a padded row of Wb pixels.
template <class F>
inline void for_each_pixel_block(int64_t Wb, F&& f) {
  int64_t ox = 0;
  for (; ox + kPixels <= Wb; ox += kPixels) f(std::integral_constant<int, kPixels>{}, ox);
  if (Wb - ox == 6) f(std::integral_constant<int, 6>{}, ox);
  if (Wb - ox == 4) f(std::integral_constant<int, 4>{}, ox);
}

// The per-head value x[h] of the heads of a vector (x at its first head) in their lanes: all 16
// for D = 16; x[0] in lanes 0-7 and x[1] in lanes 8-15 for D = 8.
inline vf head_lanes(const float* x, int64_t D) {
  if (D == 16) return vset1(*x);
  double two;
  std::memcpy(&two, x, sizeof(two));
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(halves, _mm512_castpd_ps(_mm512_set1_pd(two)));
}

// The ring's budget: a quarter of an L2 of 1 MiB or more, next to the task's exp(cost - M) and
// 1 / S (the QnA-ViT tiny layers need 220-330 KiB for all their heads).
constexpr int64_t kRingBytes = int64_t{384} << 10;

struct Geometry {
  int64_t k, s, pad, taps, R;
  int64_t NR;        // plane rows of a task: (R - 1) * s + k
  int64_t Wb;        // output pixels of a row, padded (padded_width)
  int64_t WP;        // plane columns: (Wb - 1) * s + k + 1 (column x holds input column x - pad)
  int64_t QH, QHp;   // (q, h) lanes and their whole vectors
  int64_t HV;        // heads of a vector: 16 / D
  int64_t NV;        // head vectors: H / HV
  int64_t pairs;     // tap pairs of a tap row: (k + 1) / 2
  int64_t GV;        // head vectors packed and summed together (a group)
  int64_t parities;  // weight tables: 2 at stride 1 (output columns start even or odd), 1 at 2
  int64_t RC;        // pairs of a ring row: plane columns 2c and 2c + 1 in pair c

  explicit Geometry(const QnaAttentionFwdArgs& a)
      : k(a.kernel_size), s(a.stride), pad(a.pad), taps(a.kernel_size * a.kernel_size),
        R(a.tasks.rows_per_task) {
    NR = (R - 1) * s + k;
    Wb = padded_width(a.Wo, s);
    WP = (Wb - 1) * s + k + 1;
    QH = a.Q * a.H;
    QHp = round_up(QH, kW);
    HV = kW / a.D;
    NV = a.H / HV;
    pairs = (k + 1) / 2;
    parities = s == 1 ? 2 : 1;
    RC = (WP + 1) / 2;
    // As many head vectors as fit kRingBytes (measured at the QnA-ViT tiny shapes: every head
    // in one group is 2-5% faster than groups of a cache line of values).
    GV = std::clamp<int64_t>(kRingBytes / (a.Q * k * RC * kW * int64_t{sizeof(uint32_t)}), 1, NV);
  }
};

// Tap tables: er[t][QHp] in (q, h) lanes (0 in padding lanes), Rmax[QHp], and the bf16 weight
// pairs [head vector][q][ty][parity][pair][kW]. A pair of plane columns starts at an even
// column, so an output column whose window starts at an even plane column (parity 0: every one
// at stride 2) weighs pair i with ers_q[ty, 2i] | ers_q[ty, 2i + 1] << 16, one that starts at an
// odd column (parity 1) with ers_q[ty, 2i - 1] | ers_q[ty, 2i] << 16; a tap outside [0, k) is 0.
struct Tables {
  std::vector<float> er, rmax;
  std::vector<uint32_t> weight_pairs;
  int64_t per_query;  // weight pairs of a (head vector, q): [ty][parity][pair][kW]

  Tables(const QnaAttentionFwdArgs& a, const Geometry& g)
      : per_query(g.k * g.parities * g.pairs * kW) {
    const pixel::Tables tab(a);
    er.assign(g.taps * g.QHp, 0.0f);
    rmax.assign(g.QHp, 0.0f);
    weight_pairs.assign(g.NV * a.Q * per_query, 0u);
    for (int64_t h = 0; h < a.H; ++h) {
      for (int64_t q = 0; q < a.Q; ++q) {
        rmax[q * a.H + h] = tab.rmax[h * a.Q + q];
        const float* er_q = tab.of(tab.er, a.Q, h, q);
        const float* ers_q = tab.of(tab.ers, a.Q, h, q);
        for (int64_t t = 0; t < g.taps; ++t) er[t * g.QHp + q * a.H + h] = er_q[t];
        uint32_t* head = weight_pairs.data() + (h / g.HV * a.Q + q) * per_query + h % g.HV * a.D;
        const auto tap = [&](int64_t ty, int64_t tx) -> uint32_t {
          return tx >= 0 && tx < g.k ? f32_to_bf16(ers_q[ty * g.k + tx]) : 0u;
        };
        for (int64_t ty = 0; ty < g.k; ++ty) {
          for (int64_t parity = 0; parity < g.parities; ++parity) {
            for (int64_t i = 0; i < g.pairs; ++i) {
              const uint32_t pair = tap(ty, 2 * i - parity) | tap(ty, 2 * i + 1 - parity) << 16;
              uint32_t* lane = head + ((ty * g.parities + parity) * g.pairs + i) * kW;
              for (int64_t d = 0; d < a.D; ++d) lane[d] = pair;
            }
          }
        }
      }
    }
  }
  // The weight pairs of head vector hv and query q.
  const uint32_t* pairs_of(const QnaAttentionFwdArgs& a, int64_t hv, int64_t q) const {
    return weight_pairs.data() + (hv * a.Q + q) * per_query;
  }
};

// Per-thread buffers.
struct Scratch {
  float* ec;        // [NR][WP][QHp] exp(cost - M), 0 outside the image
  float* cost_max;  // [QHp] M
  float* inv;       // [R][Wb][QHp] 1 / S (0 for the padding pixels)
  uint32_t* ring;   // [GV][Q][k][RC][kW] pairs of u of a group: plane row y in slot y % k
  float* row;       // [kW] one pixel's values of a head vector (strided v)

  int64_t carve(float* base, const QnaAttentionFwdArgs& a, const Geometry& g) {
    Carver c(base);
    ec = c.take(g.NR * g.WP * g.QHp);
    cost_max = c.take(g.QHp);
    inv = c.take(g.R * g.Wb * g.QHp);
    ring = reinterpret_cast<uint32_t*>(c.take(g.GV * a.Q * g.k * g.RC * kW));
    row = c.take(kW);
    return c.used();
  }
  // Ring slot `slot` of head vector hvl of the group and query q.
  uint32_t* ring_slot(const QnaAttentionFwdArgs& a, const Geometry& g, int64_t hvl, int64_t q,
                      int64_t slot) const {
    return ring + ((hvl * a.Q + q) * g.k + slot) * g.RC * kW;
  }
};

// exp(cost - M) of the task's plane rows (input row y0 + r at plane row r), M the max over them.
inline void pack_exps(const QnaAttentionFwdArgs& a, const Geometry& g, const Scratch& w,
                      int64_t b, int64_t y0) {
  std::memset(w.ec, 0, sizeof(float) * g.NR * g.WP * g.QHp);
  const int64_t* st = a.cost_stride;
  const int64_t x_end = std::min(a.Wi, g.WP - g.pad);
  const int64_t r_begin = std::max<int64_t>(0, -y0), r_end = std::min(g.NR, a.Hi - y0);
  const int64_t nv = g.QHp / kW;
  for (int64_t i = 0; i < g.QHp; ++i) w.cost_max[i] = -std::numeric_limits<float>::infinity();
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t x = 0; x < x_end; ++x) {
      float* e = w.ec + (r * g.WP + x + g.pad) * g.QHp;
      load_block<ElemType::kBFloat16>(a.cost, b * st[0] + (y0 + r) * st[1] + x * st[2], st[3],
                                      st[4], a.Q, a.H, e);
      for (int64_t i = 0; i < nv; ++i)
        vstore(w.cost_max + i * kW, vmax(vload(w.cost_max + i * kW), vload(e + i * kW)));
    }
  }
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t x = 0; x < x_end; ++x) {
      float* e = w.ec + (r * g.WP + x + g.pad) * g.QHp;
      // Padding lanes (past QH) hold exp(0 - 0) = 1; their er is 0 and no u reads them.
      for (int64_t i = 0; i < nv; ++i)
        vstore(e + i * kW, vexp(vsub(vload(e + i * kW), vload(w.cost_max + i * kW))));
    }
  }
}

// Calls f(std::integral_constant<int, c>{}) for c = 0 .. N - 1.
template <int N, class F>
inline void for_each_index(F&& f) {
  [&]<int... Cs>(std::integer_sequence<int, Cs...>) {
    (f(std::integral_constant<int, Cs>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// S_q of NP output pixels of a row from (r, ox), vector i of the (q, h) lanes. Pixel n reads
// plane column n * S + tx at tap (ty, tx): each column is loaded once per tap row and multiplied
// into every pixel that reads it, with the row's K weights in registers.
template <int NP, int K, int S>
inline void pixel_sums(const Geometry& g, const Tables& tab, const Scratch& w, int64_t r,
                       int64_t ox, int64_t i, vf* sum) {
  for_each_index<NP>([&](auto n) { sum[n] = vzero(); });
  const int64_t stride = g.QHp;
  for (int64_t ty = 0; ty < K; ++ty) {
    const float* e = w.ec + ((r * S + ty) * g.WP + ox * S) * stride + i * kW;
    const float* er_row = tab.er.data() + ty * K * stride + i * kW;
    vf er[K];
    for_each_index<K>([&](auto tx) { er[tx] = vload(er_row + tx * stride); });
    for_each_index<(NP - 1) * S + K>([&](auto c) {
      const vf col = vload(e + c * stride);
      for_each_index<K>([&](auto tx) {
        constexpr int j = decltype(c)::value - decltype(tx)::value;
        if constexpr (j >= 0 && j % S == 0 && j / S < NP)
          sum[j / S] = vfma(col, er[tx], sum[j / S]);
      });
    });
  }
}

// S, lse and 1 / S of the task's output pixels (rows oy0 + [0, R)). Returns false, lse stored in
// part, when a window's sum is too small for the task's reference.
template <int K, int S>
inline bool softmax_sums(const QnaAttentionFwdArgs& a, const Geometry& g, const Tables& tab,
                         const Scratch& w, int64_t b, int64_t oy0, int64_t R) {
  const int64_t nv = g.QHp / kW;
  const __mmask16 last = static_cast<__mmask16>((1u << (g.QH - (nv - 1) * kW)) - 1u);
  bool ok = true;
  const auto block = [&](auto np, int64_t r, int64_t ox) {
    constexpr int NP = decltype(np)::value;
    for (int64_t i = 0; i < nv; ++i) {
      vf sum[NP];
      pixel_sums<NP, K, S>(g, tab, w, r, ox, i, sum);
      const __mmask16 real = i + 1 < nv ? static_cast<__mmask16>(0xffff) : last;
      const vf ref = vadd(vload(w.cost_max + i * kW), vload(tab.rmax.data() + i * kW));
      for_each_index<NP>([&](auto n) {
        float* inv = w.inv + (r * g.Wb + ox + n) * g.QHp + i * kW;
        if (ox + n >= a.Wo) {  // padding pixel: never stored
          vstore(inv, vzero());
          return;
        }
        const vf iv = vdiv(vset1(1.0f), sum[n]);
        if (_mm512_mask_cmp_ps_mask(real, iv, vset1(kMaxReferenceScale), _CMP_NLE_UQ) != 0)
          ok = false;
        vstore(inv, _mm512_maskz_mov_ps(real, iv));
        float* lse = a.lse + ((b * a.Ho + oy0 + r) * a.Wo + ox + n) * g.QH + i * kW;
        _mm512_mask_storeu_ps(lse, real, vadd(ref, vlog(sum[n])));
      });
    }
  };
  for (int64_t r = 0; r < R && ok; ++r)
    for_each_pixel_block(g.Wb, [&](auto np, int64_t ox) { block(np, r, ox); });
  return ok;
}

// v of the heads of a vector at one pixel (v at its first head), lane (h % HV) * D + d.
inline vf vector_values(const uint16_t* v, const int64_t* st, int64_t D, float* row) {
  if (st[4] == 1 && (D == 16 || st[3] == 8))
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))), 16));
  for (int64_t l = 0; l < kW; ++l) row[l] = bf16_to_f32(v[l / D * st[3] + l % D * st[4]]);
  return vload(row);
}

// Plane row y (input row y0 + y) of the group's head vectors [hv0, hv0 + nv) into their ring
// slots: u = exp(cost_q - M) v in a vector per (head vector, q), each even plane column paired
// with the next (see the section's top); 0 outside the image. NQ = Q (1 to 4), so that a pixel's
// values are loaded once for all queries.
template <int NQ>
inline void pack_row(const QnaAttentionFwdArgs& a, const Geometry& g, const Scratch& w, int64_t b,
                     int64_t y0, int64_t y, int64_t hv0, int64_t nv) {
  const int64_t slot = y % g.k;
  const int64_t yi = y0 + y;
  if (yi < 0 || yi >= a.Hi) {
    for (int64_t hvl = 0; hvl < nv; ++hvl)
      for (int64_t q = 0; q < NQ; ++q)
        std::memset(w.ring_slot(a, g, hvl, q, slot), 0, sizeof(uint32_t) * g.RC * kW);
    return;
  }
  const int64_t* st = a.v_stride;
  const auto* v = static_cast<const uint16_t*>(a.v) + b * st[0] + yi * st[1] + hv0 * g.HV * st[3];
  // The group's values two rows on, which it packs soon: they come from memory.
  // (Measured: prefetching every cache line of the group, or 1 or 4 rows on, is no faster.)
  if (yi + 2 < a.Hi)
    for (int64_t x = 0; x < a.Wi; ++x)
      _mm_prefetch(reinterpret_cast<const char*>(v + 2 * st[1] + x * st[2]), _MM_HINT_T0);
  const __m512i order = pair_order();
  // Plane columns [x_begin, x_end) hold pixels; the others are 0.
  const int64_t x_begin = g.pad, x_end = std::min(a.Wi + g.pad, g.WP);
  for (int64_t hvl = 0; hvl < nv; ++hvl) {
    const uint16_t* vh = v + hvl * g.HV * st[3] - g.pad * st[2];
    const float* e = w.ec + y * g.WP * g.QHp + (hv0 + hvl) * g.HV;
    uint32_t* dst[NQ];
    for_each_index<NQ>([&](auto q) { dst[q] = w.ring_slot(a, g, hvl, q, slot); });
    // u of every query at plane column x.
    const auto column = [&](int64_t x, vf* u) {
      if (x < x_begin || x >= x_end) {
        for_each_index<NQ>([&](auto q) { u[q] = vzero(); });
        return;
      }
      const vf values = vector_values(vh + x * st[2], st, a.D, w.row);
      const float* ex = e + x * g.QHp;
      for_each_index<NQ>([&](auto q) { u[q] = vmul(head_lanes(ex + q * a.H, a.D), values); });
    };
    // Pair c holds u[2c] | u[2c + 1] << 16.
    for (int64_t c = 0; c < g.RC; ++c) {
      vf even[NQ], odd[NQ];
      column(2 * c, even);
      column(2 * c + 1, odd);
      for_each_index<NQ>([&](auto q) {
        _mm512_store_si512(dst[q] + c * kW, bf16_pairs(even[q], odd[q], order));
      });
    }
  }
}

// out of head vector hv at NP output pixels of row r from ox: per query the pair sums,
// normalised by 1 / S_q, summed over the queries. Each pair column of a tap row is loaded once and
// multiplied into every pixel that reads it.
template <int NP, int K, int S>
inline void vector_block(const QnaAttentionFwdArgs& a, const Geometry& g, const Tables& tab,
                         const Scratch& w, int64_t b, int64_t oy0, int64_t r, int64_t ox,
                         int64_t hv, int64_t hvl) {
  constexpr int P = (K + 1) / 2;
  // Parities of the weights (see Tables); pixel n's window starts at plane column (ox + n) * S,
  // in pair (ox + n) * S / 2 (ox is even), so it reads pairs base(n) + p, p < P.
  constexpr int kParities = S == 1 ? 2 : 1;
  constexpr auto base = [](int n) { return S == 1 ? n / 2 : n; };
  vf out[NP];
  for (int64_t q = 0; q < a.Q; ++q) {
    const uint32_t* weights = tab.pairs_of(a, hv, q);
    vf acc[NP];
    for_each_index<NP>([&](auto n) { acc[n] = vzero(); });
    for (int64_t ty = 0; ty < K; ++ty) {
      const uint32_t* row = w.ring_slot(a, g, hvl, q, (r * S + ty) % K) + ox * S / 2 * kW;
      __m512bh wt[kParities][P];
      for_each_index<kParities>([&](auto parity) {
        for_each_index<P>([&](auto p) {
          const uint32_t* pair = weights + ((ty * kParities + parity) * P + p) * kW;
          wt[parity][p] = (__m512bh)_mm512_loadu_si512(pair);
        });
      });
      for_each_index<base(NP - 1) + P>([&](auto c) {
        const __m512bh col = (__m512bh)_mm512_load_si512(row + c * kW);
        for_each_index<NP>([&](auto n) {
          constexpr int p = decltype(c)::value - base(decltype(n)::value);
          if constexpr (p >= 0 && p < P)
            acc[n] = _mm512_dpbf16_ps(acc[n], wt[decltype(n)::value % kParities][p], col);
        });
      });
    }
    const float* inv = w.inv + (r * g.Wb + ox) * g.QHp + q * a.H + hv * g.HV;
    for_each_index<NP>([&](auto n) {
      const vf scale = head_lanes(inv + n * g.QHp, a.D);
      out[n] = q == 0 ? vmul(acc[n], scale) : vfma(acc[n], scale, out[n]);
    });
  }
  // The vector's heads are adjacent in out: one plain store of kW bf16 per pixel.
  const int64_t first = (b * a.Ho + oy0 + r) * a.Wo + ox;  // output pixel
  auto* dst = static_cast<uint16_t*>(a.out) + (first * a.H + hv * g.HV) * a.D;
  for_each_index<NP>([&](auto n) {
    if (ox + n < a.Wo)  // else a padding pixel
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n * a.H * a.D),
                          (__m256i)_mm512_cvtneps_pbh(out[n]));
  });
}

using Fallback = void (*)(const QnaAttentionFwdArgs&, int64_t, int64_t);

template <int K, int S>
inline void forward_tasks(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end,
                          Fallback fallback) {
  const Geometry g(a);
  const Tables tab(a, g);
  Scratch w{};
  const AlignedBuffer mem(w.carve(nullptr, a, g), /*zeroed=*/true);
  w.carve(mem.data(), a, g);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.tasks.tasks_per_image;
    const int64_t oy0 = task % a.tasks.tasks_per_image * g.R;
    const int64_t R = std::min(a.Ho - oy0, g.R);
    const int64_t y0 = oy0 * S - g.pad;
    pack_exps(a, g, w, b, y0);
    if (!softmax_sums<K, S>(a, g, tab, w, b, oy0, R)) {
      fallback(a, task, task + 1);
      continue;
    }
    // Groups of head vectors, each over the task's output rows.
    for (int64_t hv0 = 0; hv0 < g.NV; hv0 += g.GV) {
      const int64_t nv = std::min(g.GV, g.NV - hv0);
      for (int64_t r = 0; r < R; ++r) {
        // The plane rows output row r reads that the ring does not hold yet.
        for (int64_t y = r == 0 ? 0 : (r - 1) * S + K; y < r * S + K; ++y) {
          switch (a.Q) {
            case 1: pack_row<1>(a, g, w, b, y0, y, hv0, nv); break;
            case 2: pack_row<2>(a, g, w, b, y0, y, hv0, nv); break;
            case 3: pack_row<3>(a, g, w, b, y0, y, hv0, nv); break;
            default: pack_row<4>(a, g, w, b, y0, y, hv0, nv); break;
          }
        }
        for (int64_t hvl = 0; hvl < nv; ++hvl)
          for_each_pixel_block(g.Wb, [&](auto np, int64_t ox) {
            vector_block<decltype(np)::value, K, S>(a, g, tab, w, b, oy0, r, ox, hv0 + hvl, hvl);
          });
      }
    }
  }
}

// bf16 inputs whose shapes fit (isa/bf16_kernels.inc); a task with a window on the direct path
// runs `fallback` instead.
inline void forward_impl(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end,
                         Fallback fallback) {
  const auto with_stride = [&](auto k) {
    if (a.stride == 1)
      forward_tasks<decltype(k)::value, 1>(a, task_begin, task_end, fallback);
    else
      forward_tasks<decltype(k)::value, 2>(a, task_begin, task_end, fallback);
  };
  switch (a.kernel_size) {
    case 3: with_stride(std::integral_constant<int, 3>{}); break;
    case 5: with_stride(std::integral_constant<int, 5>{}); break;
    case 7: with_stride(std::integral_constant<int, 7>{}); break;
    case 9: with_stride(std::integral_constant<int, 9>{}); break;
    case 11: with_stride(std::integral_constant<int, 11>{}); break;
    default: with_stride(std::integral_constant<int, 13>{}); break;
  }
}

}  // namespace channel_pairs
#endif  // FVK_QNA_VALUE_PAIRS

// ---------------------------------------------------------------------------------------------
// Entry points: one instantiation per element type
// ---------------------------------------------------------------------------------------------

template <ElemType T>
inline void forward_dispatch(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  if (a.batch_heads > 0)
    batch::forward_impl<T>(a, task_begin, task_end);
  else if (a.pixel_lanes)
    pixel::forward_impl<T>(a, task_begin, task_end);
  else
    forward_impl<T>(a, task_begin, task_end);
}

template <ElemType T>
inline void backward_dispatch(const QnaAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  if (a.pixel_lanes)
    pixel::backward_impl<T>(a, task_begin, task_end);
  else
    backward_impl<T>(a, task_begin, task_end);
}

inline void forward_kernel(const QnaAttentionFwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: forward_dispatch<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: forward_dispatch<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: forward_dispatch<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

inline void backward_kernel(const QnaAttentionBwdArgs& a, int64_t task_begin, int64_t task_end) {
  switch (a.dtype) {
    case ElemType::kFloat32: backward_dispatch<ElemType::kFloat32>(a, task_begin, task_end); break;
    case ElemType::kBFloat16: backward_dispatch<ElemType::kBFloat16>(a, task_begin, task_end); break;
    case ElemType::kFloat16: backward_dispatch<ElemType::kFloat16>(a, task_begin, task_end); break;
  }
}

}  // namespace qna_attention
#endif  // FVK_KERNEL_BODIES
