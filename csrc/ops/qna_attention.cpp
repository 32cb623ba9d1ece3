// Torch-facing half of the CPU QnA-attention op (docs/qna_attention.md): argument checks, output
// allocation in the contract's layouts, the work split, the kernels of the ISA chosen at run time
// (kernels/qna_attention.h, through ops/dispatch.h), the ordered sums of what the backward's tasks
// leave to combine (the rpe / attn_scale gradients and the input rows two tasks share), and the
// op's registration with PyTorch's dispatcher. The contract is the docstring of
// fastvit_kernels/reference/qna_attention.py.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "kernels/qna_attention.h"
#include "ops/autograd.h"
#include "ops/checks.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

// Windows up to 15 x 15 (the paper uses 3 and 7); the Python op sends larger ones to the reference.
constexpr int64_t kMaxKernelSize = 15;

// ---------------------------------------------------------------------------------------------
// Argument checks (the shared ones are in ops/checks.h)
// ---------------------------------------------------------------------------------------------

void check_window(const char* fn, int64_t kernel_size, int64_t stride) {
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= kMaxKernelSize, fn,
                    ": kernel_size must be odd and in [1, ", kMaxKernelSize, "], got ",
                    kernel_size);
  TORCH_CHECK_VALUE(stride >= 1, fn, ": stride must be >= 1, got ", stride);
}

// cost [B, Hi, Wi, Q, h] and v [B, Hi, Wi, h, d] of one floating dtype; rpe and attn_scale
// [k*k, Q, h] in cost's dtype or float32.
void check_inputs(const char* fn, const at::Tensor& cost, const at::Tensor& v,
                  const at::Tensor& rpe, const at::Tensor& attn_scale, int64_t kernel_size) {
  check_cpu_nd(fn, "cost", cost, 5, "[B, Hi, Wi, Q, h]");
  check_cpu_nd(fn, "v", v, 5, "[B, Hi, Wi, h, d]");
  const auto dt = cost.scalar_type();
  check_float_dtype(fn, "cost", cost);
  check_dtype(fn, "v", v, dt, "cost");
  const int64_t B = cost.size(0), Hi = cost.size(1), Wi = cost.size(2);
  const int64_t Q = cost.size(3), H = cost.size(4);
  TORCH_CHECK(cost.numel() > 0 && v.size(4) > 0, fn,
              ": every dimension of cost and v must be >= 1, got cost ", cost.sizes(), ", v ",
              v.sizes());
  check_shape(fn, "v", v, {B, Hi, Wi, H, v.size(4)}, "[B, Hi, Wi, h, d] (B, Hi, Wi, h from cost)");
  const int64_t taps = kernel_size * kernel_size;
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] : {Named{"rpe", rpe}, Named{"attn_scale", attn_scale}}) {
    check_defined_cpu(fn, name, t);
    check_shape(fn, name, t, {taps, Q, H}, "[k*k, Q, h]");
    check_param_dtype(fn, name, t, dt, "cost");
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments and work split
// ---------------------------------------------------------------------------------------------

int64_t output_size(int64_t size, int64_t kernel_size, int64_t stride) {
  return (size + 2 * ((kernel_size - 1) / 2) - kernel_size) / stride + 1;
}

// The part of the kernel arguments forward and backward share. rpe32 / attn_scale32 are the fp32
// contiguous copies (the caller keeps them alive).
void fill_inputs(QnaAttentionInputs& a, const at::Tensor& cost, const at::Tensor& v,
                 const at::Tensor& rpe32, const at::Tensor& attn_scale32, int64_t kernel_size,
                 int64_t stride) {
  a.B = cost.size(0); a.Hi = cost.size(1); a.Wi = cost.size(2);
  a.Q = cost.size(3); a.H = cost.size(4); a.D = v.size(4);
  a.kernel_size = kernel_size; a.stride = stride; a.pad = (kernel_size - 1) / 2;
  a.Ho = output_size(a.Hi, kernel_size, stride);
  a.Wo = output_size(a.Wi, kernel_size, stride);
  a.dtype = elem_type(cost.scalar_type());
  a.cost = cost.data_ptr(); copy_strides(cost, a.cost_stride);
  a.v = v.data_ptr(); copy_strides(v, a.v_stride);
  a.rpe = rpe32.data_ptr<float>();
  a.attn_scale = attn_scale32.data_ptr<float>();
}

// Tasks are (image, block of output rows). A block is as tall as fits: the task's packed input
// rows (halo included) stay within a budget, so they stay in L2 while the task runs over them
// (and the exp reference of the factorisation stays local); and short enough for kMinTasks
// tasks in all (a batch of 1 still spreads over the cores). Shapes only, never the thread count:
// results are bitwise reproducible for any number of threads. The backward's budget is larger:
// fewer, taller blocks share fewer input rows (measured ~10% faster at QnA-ViT shapes).
constexpr int64_t kForwardPackedBytes = int64_t{384} << 10;
constexpr int64_t kBackwardPackedBytes = int64_t{1024} << 10;
constexpr int64_t kMinTasks = 16;

// floats_per_pixel: what a task packs per input pixel.
RowTasks row_tasks(const QnaAttentionInputs& a, int64_t budget_bytes, int64_t floats_per_pixel,
                   int64_t min_rows) {
  const int64_t row_bytes = a.Wi * floats_per_pixel * int64_t{sizeof(float)};
  const int64_t input_rows = budget_bytes / std::max<int64_t>(1, row_bytes);
  const int64_t rows_fitting = (input_rows - a.kernel_size) / a.stride + 1;
  const int64_t blocks_wanted = (kMinTasks + a.B - 1) / a.B;
  const int64_t rows_parallel = (a.Ho + blocks_wanted - 1) / blocks_wanted;
  const int64_t per_task =
      std::min(a.Ho, std::max({int64_t{1}, min_rows, std::min(rows_parallel, rows_fitting)}));
  return {per_task, (a.Ho + per_task - 1) / per_task};
}

// The pixel-lane kernels (kernels/qna_attention.h, "Pixel lanes") or the channel-lane ones, from
// the shapes only. Measured at the QnA-ViT tiny maps (d = 8, one thread): pixel lanes win from
// k = 5 on at stride 1; at stride 2 the forward's from k = 5 on at every tiny map (Wo = 28, 14, 7:
// 1.1-1.5x against channel lanes at k = 5 and 7), the backward's at k = 7 only with Wo >= 14
// (a 7-wide output row fills few lanes of the s*s phase planes: 1.3x slower at 14 x 14 -> 7 x 7).
// Strides above 2 (no QnA-ViT layer uses them; not re-measured) keep the earlier forward rule.
bool use_pixel_lanes(const QnaAttentionInputs& a, bool backward) {
  if (a.kernel_size < 5) return false;
  if (a.stride == 1) return true;
  if (backward) return a.kernel_size >= 7 && a.Wo >= 14;
  if (a.stride == 2) return true;
  return a.Wo >= (a.kernel_size >= 9 ? 14 : 28) && a.kernel_size >= 7;
}

// Tasks of the pixel-lane kernels: as row_tasks, but sized by their planes: per output row of a
// task, stride^2 plane rows of pitch P of every input-side channel, and P positions of every
// output-side channel; the window adds (max_shift - min_shift) plane rows. A task reads its planes
// head by head (a head's fit in L1), so the budget is most of L2: taller tasks repack fewer halo
// rows and waste fewer lanes on partial blocks (measured 1.3-1.8x at the 14 x 14 QnA-ViT maps
// against 768 KiB).
constexpr int64_t kPixelPlaneBytes = int64_t{1536} << 10;

RowTasks pixel_row_tasks(const QnaAttentionInputs& a, int64_t in_channels, int64_t out_channels,
                         int64_t min_rows) {
  const int64_t P = qna_plane_pitch(a), s2 = a.stride * a.stride;
  const int64_t halo = qna_max_shift(a) - qna_min_shift(a);
  const int64_t row_bytes = (in_channels * s2 + out_channels) * P * int64_t{sizeof(float)};
  const int64_t halo_bytes = in_channels * s2 * halo * P * int64_t{sizeof(float)};
  const int64_t rows_fitting = (kPixelPlaneBytes - halo_bytes) / std::max<int64_t>(1, row_bytes);
  const int64_t blocks_wanted = (kMinTasks + a.B - 1) / a.B;
  const int64_t rows_parallel = (a.Ho + blocks_wanted - 1) / blocks_wanted;
  const int64_t most =
      std::min(a.Ho, std::max({int64_t{1}, min_rows, std::min(rows_parallel, rows_fitting)}));
  // The same number of tasks, evened out: a last task of a row or two would pack its whole halo
  // for them. (Every task's planes are sized for per_task rows, so it must not exceed Ho.)
  const int64_t count = (a.Ho + most - 1) / most;
  const int64_t per_task = std::max((a.Ho + count - 1) / count, min_rows);
  return {per_task, (a.Ho + per_task - 1) / per_task};
}

// Heads per task of the batch-lane forward (kernels/qna_attention.h, "Batch lanes"): a task's
// planes hold, per head and image, the raw cost, exp(cost - M) and v of every input pixel and out
// and lse of every output pixel; as many heads as fit the pixel lanes' budget, evened out.
int64_t batch_heads(const QnaAttentionInputs& a) {
  const int64_t per_head = ((2 * a.Q + a.D) * a.Hi * a.Wi + (a.Q + a.D) * a.Ho * a.Wo) *
                           kQnaBatchLanes * int64_t{sizeof(float)};
  const int64_t most = std::clamp<int64_t>(kPixelPlaneBytes / per_head, 1, a.H);
  const int64_t count = (a.H + most - 1) / most;
  return (a.H + count - 1) / count;
}

// The batch-lane forward instead of the pixel lanes, from the shapes only. It does only the
// in-image taps, but its tasks gather kQnaBatchLanes images per pixel, which costs about as much
// as the pixel lanes' whole forward at k = 7 (one thread, fp32, B = 32, QnA-ViT tiny maps: at
// k = 1 3.5 ms at 14 x 14 x 64 heads, 14.6 at 28 x 28 x 32 heads, against 1.2 and 2.4). Measured
// there against the pixel lanes (ms): stride 2, 14 x 14 -> 7 x 7, 64 heads: k = 9 4.7 / 4.6,
// k = 11 5.6 / 7.3, k = 13 6.4 / 8.5; 14 x 14 at stride 1 (32 heads) at most 5% faster (k = 13);
// 28 x 28 -> 14 x 14 at stride 2 1.5-2.5x slower at every k. At most a quarter of the last
// group's lanes may be empty.
bool use_batch_lanes(const QnaAttentionInputs& a) {
  const int64_t lanes = (a.B + kQnaBatchLanes - 1) / kQnaBatchLanes * kQnaBatchLanes;
  return a.stride == 2 && a.kernel_size >= 11 && a.Ho <= 7 && a.Wo <= 7 &&
         a.B >= kQnaBatchLanes && lanes * 4 <= a.B * 5;
}

// dcost / dv of the input rows that tasks i and i + 1 of image b share: the upper task's bottom
// edge slot plus the lower task's top edge slot, in that order (see QnaAttentionBwdArgs).
template <typename scalar_t>
void add_shared_rows(const QnaAttentionBwdArgs& a, int64_t b, int64_t i) {
  const int64_t QH = a.Q * a.H, C = a.H * a.D, pixel = QH + C;
  const float* slots = qna_pair_slots(a, b, i);
  const int64_t slot = qna_edge_slot_floats(a);
  // The rows that both the upper task's last output row and the lower task's first read.
  const int64_t oy = (i + 1) * a.tasks.rows_per_task;
  const int64_t y_begin = std::max<int64_t>(0, oy * a.stride - a.pad);
  const int64_t y_end = std::min(a.Hi, (oy - 1) * a.stride - a.pad + a.kernel_size);
  auto* dcost = static_cast<scalar_t*>(a.dcost);
  auto* dv = static_cast<scalar_t*>(a.dv);
  for (int64_t x = 0; x < (y_end - y_begin) * a.Wi; ++x) {
    const int64_t p = (b * a.Hi + y_begin) * a.Wi + x;
    const float* above = slots + x * pixel;
    const float* below = slots + slot + x * pixel;
    for (int64_t c = 0; c < QH; ++c) dcost[p * QH + c] = static_cast<scalar_t>(above[c] + below[c]);
    for (int64_t c = QH; c < pixel; ++c)
      dv[p * C + c - QH] = static_cast<scalar_t>(above[c] + below[c]);
  }
}

// Calls f(scalar_t{}) with the C++ type of a's dtype.
template <class F>
void with_scalar_type(const QnaAttentionInputs& a, F&& f) {
  switch (a.dtype) {
    case ElemType::kFloat32: f(float{}); break;
    case ElemType::kBFloat16: f(c10::BFloat16{}); break;
    case ElemType::kFloat16: f(c10::Half{}); break;
  }
}

// QnaAttentionBwdArgs::sum_image_edges: image b's pairs, from the slots of one image.
void sum_image_edges(const QnaAttentionBwdArgs& a, int64_t b) {
  with_scalar_type(a, [&](auto zero) {
    for (int64_t i = 0; i + 1 < a.tasks.tasks_per_image; ++i)
      add_shared_rows<decltype(zero)>(a, b, i);
  });
}

// Runs the backward's tasks and sums the rows neighbouring tasks share. With at least two images
// per thread, each thread runs whole images, its tasks in order, and sums an image's shared rows
// after its last task: the slots then hold one image per thread instead of the whole batch (at
// B = 32 the batch's slots were the backward's largest allocation: 11 MiB at the 14 x 14 stride-2
// QnA-ViT tiny layer, k = 7, as large as dcost and dv in fp32). The sums are the same either
// way, bit for bit: each shared row adds the same two slots in the same order.
void run_backward_tasks(QnaAttentionBwdArgs& a, const at::TensorOptions& f32) {
  const int64_t per_image = a.tasks.tasks_per_image;
  const int64_t image_slots = (per_image - 1) * 2 * qna_edge_slot_floats(a);
  if (image_slots == 0) {  // no row is read by two tasks
    a.edge_partial = nullptr;
    run_tasks(&KernelTable::qna_attention_backward, a, a.B * per_image);
    return;
  }
  if (a.B >= 2 * at::get_num_threads()) {
    const auto kernel = current_kernels().qna_attention_backward;
    at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
      at::Tensor slots = poisoned(at::empty({image_slots}, f32));
      QnaAttentionBwdArgs images = a;
      images.edge_partial = slots.data_ptr<float>();
      images.sum_image_edges = &sum_image_edges;
      kernel(images, begin * per_image, end * per_image);
    });
    return;
  }
  at::Tensor edges = poisoned(at::empty({a.B * image_slots}, f32));
  a.edge_partial = edges.data_ptr<float>();
  run_tasks(&KernelTable::qna_attention_backward, a, a.B * per_image);
  with_scalar_type(a, [&](auto zero) {
    at::parallel_for(0, a.B * (per_image - 1), 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)  // pair j: image j / (per_image - 1)
        add_shared_rows<decltype(zero)>(a, j / (per_image - 1), j % (per_image - 1));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> qna_attention_forward(
    const at::Tensor& cost, const at::Tensor& v, const at::Tensor& rpe,
    const at::Tensor& attn_scale, int64_t kernel_size, int64_t stride) {
  constexpr const char* fn = "qna_attention_forward";
  check_window(fn, kernel_size, stride);
  check_inputs(fn, cost, v, rpe, attn_scale, kernel_size);
  const at::Tensor rpe32 = rpe.to(at::kFloat).contiguous();
  const at::Tensor attn_scale32 = attn_scale.to(at::kFloat).contiguous();

  QnaAttentionFwdArgs a{};
  fill_inputs(a, cost, v, rpe32, attn_scale32, kernel_size, stride);
  at::Tensor out = poisoned(at::empty({a.B, a.Ho, a.Wo, a.H, a.D}, v.options()));
  at::Tensor lse =
      poisoned(at::empty({a.B, a.Ho, a.Wo, a.Q, a.H}, cost.options().dtype(at::kFloat)));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  // Packed per input pixel: cost and exp(cost - M), v (pixel lanes: exp(cost - M) and v; the raw
  // cost planes are packed only for a window on the direct path).
  a.pixel_lanes = use_pixel_lanes(a, false);
  a.tasks = a.pixel_lanes
                ? pixel_row_tasks(a, a.Q * a.H + a.H * a.D, a.Q * a.H + a.H * a.D, 1)
                : row_tasks(a, kForwardPackedBytes, 2 * a.Q * a.H + a.H * a.D, 1);
  if (use_batch_lanes(a)) {
    a.batch_heads = batch_heads(a);
    const int64_t groups = (a.B + kQnaBatchLanes - 1) / kQnaBatchLanes;
    run_tasks(&KernelTable::qna_attention_forward, a,
              groups * ((a.H + a.batch_heads - 1) / a.batch_heads));
    return {out, lse};
  }
  run_tasks(&KernelTable::qna_attention_forward, a, a.B * a.tasks.tasks_per_image);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qna_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& cost, const at::Tensor& v,
    const at::Tensor& rpe, const at::Tensor& attn_scale, const at::Tensor& lse,
    int64_t kernel_size, int64_t stride) {
  constexpr const char* fn = "qna_attention_backward";
  check_window(fn, kernel_size, stride);
  check_inputs(fn, cost, v, rpe, attn_scale, kernel_size);
  const at::Tensor rpe32 = rpe.to(at::kFloat).contiguous();
  const at::Tensor attn_scale32 = attn_scale.to(at::kFloat).contiguous();

  QnaAttentionBwdArgs a{};
  fill_inputs(a, cost, v, rpe32, attn_scale32, kernel_size, stride);
  check_cpu_nd(fn, "grad_out", grad_out, 5, "[B, Ho, Wo, h, d]");
  check_shape(fn, "grad_out", grad_out, {a.B, a.Ho, a.Wo, a.H, a.D}, "[B, Ho, Wo, h, d]");
  check_dtype(fn, "grad_out", grad_out, v.scalar_type(), "v");
  check_cpu_nd(fn, "lse", lse, 5, "[B, Ho, Wo, Q, h]");
  check_shape(fn, "lse", lse, {a.B, a.Ho, a.Wo, a.Q, a.H}, "[B, Ho, Wo, Q, h]");
  check_float32(fn, "lse", lse);
  // lse is checked (it is part of the contract) but not read: the kernel normalises each window
  // by its recomputed sum, exactly as the forward, so that the weights sum to 1 to rounding.
  a.grad_out = grad_out.data_ptr(); copy_strides(grad_out, a.grad_out_stride);

  const at::TensorOptions f32 = cost.options().dtype(at::kFloat);
  at::Tensor dcost = poisoned(at::empty(cost.sizes(), cost.options()));
  at::Tensor dv = poisoned(at::empty(v.sizes(), v.options()));
  a.dcost = dcost.data_ptr();
  a.dv = dv.data_ptr();
  // Packed per input pixel: cost and exp(cost - M), v, and the dcost / dv accumulators. At least
  // ceil(k / stride) rows per task, so that no input row is read by three tasks.
  const int64_t min_rows = (kernel_size + stride - 1) / stride;
  a.pixel_lanes = use_pixel_lanes(a, true);
  a.tasks = a.pixel_lanes
                ? pixel_row_tasks(a, 2 * a.Q * a.H + 2 * a.H * a.D, a.H * a.D, min_rows)
                : row_tasks(a, kBackwardPackedBytes, 3 * a.Q * a.H + 2 * a.H * a.D, min_rows);
  const int64_t tasks = a.B * a.tasks.tasks_per_image;
  const int64_t taps = kernel_size * kernel_size;
  at::Tensor partial = poisoned(at::empty({tasks, 2, taps, a.Q, a.H}, f32));
  a.param_grad_partial = partial.data_ptr<float>();
  a.edge_rows = std::max<int64_t>(0, kernel_size - stride);
  run_backward_tasks(a, f32);

  // drpe and dattn_scale: the per-task partials summed task by task in order (deterministic for
  // any thread count).
  at::Tensor drpe = poisoned(at::empty({taps, a.Q, a.H}, f32));
  at::Tensor dattn_scale = poisoned(at::empty({taps, a.Q, a.H}, f32));
  const float* part = partial.data_ptr<float>();
  float* sums[2] = {drpe.data_ptr<float>(), dattn_scale.data_ptr<float>()};
  const int64_t n = drpe.numel();
  at::parallel_for(0, 2 * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float s = 0.0f;
      for (int64_t task = 0; task < tasks; ++task) s += part[task * 2 * n + j];
      sums[j / n][j % n] = s;
    }
  });
  return {dcost, dv, drpe.to(rpe.scalar_type()), dattn_scale.to(attn_scale.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Autograd (ops/autograd.h; the Python backends' twin is in fastvit_kernels/ops/qna_attention.py)
// ---------------------------------------------------------------------------------------------

class QnaAttentionFunction : public torch::autograd::Function<QnaAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& cost, const at::Tensor& v,
                                                const at::Tensor& rpe, const at::Tensor& attn_scale,
                                                int64_t kernel_size, int64_t stride) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<decltype(qna_attention_forward)>("fastvit_kernels::qna_attention_forward");
    auto [out, lse] = op.call(cost, v, rpe, attn_scale, kernel_size, stride);
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->save_for_backward({cost, v, rpe, attn_scale, lse});
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // backward fills a missing output gradient itself
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &v = saved[1], &lse = saved[4];
    // A missing output gradient is zeros of out's shape [B, Ho, Wo, h, d] (lse is [B, Ho, Wo, Q, h]).
    const at::Tensor grad_out = grads[0].defined()
        ? grads[0]
        : at::zeros_symint({lse.sym_size(0), lse.sym_size(1), lse.sym_size(2), lse.sym_size(4), v.sym_size(4)},
                           v.options());
    static const auto op = native_op<decltype(qna_attention_backward)>("fastvit_kernels::qna_attention_backward");
    auto [dcost, dv, drpe, dattn_scale] = op.call(grad_out, saved[0], v, saved[2], saved[3], lse,
                                                  ctx->saved_data["kernel_size"].toInt(),
                                                  ctx->saved_data["stride"].toInt());
    return {dcost, dv, drpe, dattn_scale, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> qna_attention_forward_autograd(
    const at::Tensor& cost, const at::Tensor& v, const at::Tensor& rpe,
    const at::Tensor& attn_scale, int64_t kernel_size, int64_t stride) {
  auto out = QnaAttentionFunction::apply(cost, v, rpe, attn_scale, kernel_size, stride);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvit_kernels

// ---------------------------------------------------------------------------------------------
// Registration: torch.ops.fastvit_kernels.qna_attention_forward / _backward, the C++ CPU kernels of the
// op and their autograd (the Autograd section above); the fake (meta) implementations are registered by
// fastvit_kernels/ops/qna_attention.py.
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(fastvit_kernels, m) {
  m.set_python_module("fastvit_kernels.ops.qna_attention");  // registers the fake implementations
  // -> (out [B, Ho, Wo, h, d], lse [B, Ho, Wo, Q, h] fp32)
  m.def("qna_attention_forward(Tensor cost, Tensor v, Tensor rpe, Tensor attn_scale, "
        "int kernel_size, int stride) -> (Tensor, Tensor)");
  // -> (dcost, dv, drpe, dattn_scale)
  m.def("qna_attention_backward(Tensor grad_out, Tensor cost, Tensor v, Tensor rpe, "
        "Tensor attn_scale, Tensor lse, int kernel_size, int stride) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit_kernels, CPU, m) {
  m.impl("qna_attention_forward", &fastvit_kernels::cpu::qna_attention_forward);
  m.impl("qna_attention_backward", &fastvit_kernels::cpu::qna_attention_backward);
}

TORCH_LIBRARY_IMPL(fastvit_kernels, Autograd, m) {
  m.impl("qna_attention_forward", &fastvit_kernels::cpu::qna_attention_forward_autograd);
}
