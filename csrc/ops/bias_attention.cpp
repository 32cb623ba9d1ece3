// Torch-facing half of the CPU bias-attention op (docs/bias_attention.md): argument checks,
// output allocation in the contract's layouts, the dense fp32 bias, the work split, the kernels of
// the ISA chosen at run time (kernels/bias_attention.h, through ops/dispatch.h), and the op's
// registration with PyTorch's dispatcher. The contract is the docstring of
// fastvit_kernels/reference/bias_attention.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "kernels/bias_attention.h"
#include "ops/autograd.h"
#include "ops/checks.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks (the shared ones are in ops/checks.h)
// ---------------------------------------------------------------------------------------------

// q [B,H,Nq,Dk], k [B,H,Nk,Dk], v [B,H,Nk,Dv], one floating dtype.
void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_4d(fn, "q", q);
  check_cpu_4d(fn, "k", k);
  check_cpu_4d(fn, "v", v);
  check_float_dtype(fn, "q", q);
  check_dtype(fn, "k", k, q.scalar_type(), "q");
  check_dtype(fn, "v", v, q.scalar_type(), "q");
  check_size(fn, "k", k, 0, q.size(0), "B, from q");
  check_size(fn, "k", k, 1, q.size(1), "H, from q");
  check_size(fn, "k", k, 3, q.size(3), "Dk, from q");
  check_size(fn, "v", v, 0, q.size(0), "B, from q");
  check_size(fn, "v", v, 1, q.size(1), "H, from q");
  check_size(fn, "v", v, 2, k.size(2), "Nk, from k");
  TORCH_CHECK(k.size(2) >= 1, fn, ": k needs at least one key token, got shape ", k.sizes());
  TORCH_CHECK(q.size(3) >= 1, fn, ": q/k need a head width Dk >= 1, got q shape ", q.sizes());
  TORCH_CHECK(v.size(3) >= 1, fn, ": v needs a head width Dv >= 1, got shape ", v.sizes());
}

Activation parse_activation(const char* fn, const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "hardswish") return Activation::kHardswish;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, fn, ": activation must be one of 'none', 'hardswish', 'silu', got '",
                    name, "'");
  return Activation::kNone;
}

// ---------------------------------------------------------------------------------------------
// Layouts and the dense bias
// ---------------------------------------------------------------------------------------------

// The bias as fp32 rows for the kernels (see kernels/bias_attention.h): row (h, i) holds
// table[h, index[i, j]] for j < Nk, then -inf up to a whole number of kBiasRowAlign floats.
// Also returns the validated index as dense int32 [Nq, Nk] (for dtable in backward).
struct DenseBias {
  at::Tensor rows;     // [H, Nq, ld] fp32, or [ld] when there is no table
  at::Tensor index32;  // [Nq, Nk] int32, undefined when there is no table
  int64_t h_stride = 0, i_stride = 0, ld = 0, T = 0;
  at::Tensor mask_rows;  // [W, Nq, ld] fp32 padded with 0, undefined without a mask
  int64_t mask_windows = 1;
};

// index as dense int32 [Nq, Nk], after checking every value lies in [0, T) (the message is the
// one the Python backends give, ops/bias_attention.py).
template <typename I>
void convert_index(const at::Tensor& index, int64_t T, int32_t* out) {
  const I* src = index.data_ptr<I>();
  const int64_t Nq = index.size(0), Nk = index.size(1);
  const int64_t s0 = index.stride(0), s1 = index.stride(1);
  int64_t low = std::numeric_limits<int64_t>::max(), high = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < Nq; ++i) {
    for (int64_t j = 0; j < Nk; ++j) {
      const int64_t x = static_cast<int64_t>(src[i * s0 + j * s1]);
      low = std::min(low, x);
      high = std::max(high, x);
      out[i * Nk + j] = static_cast<int32_t>(x);
    }
  }
  TORCH_CHECK_INDEX(low >= 0 && high < T, "bias_attention: bias_index values must be in [0, T=", T,
                    ") (T = bias_table.shape[1]), got values from ", low, " to ", high);
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The mask [W, Nq, Nk] as fp32 rows of ld floats, zero-padded (the bias rows' -inf masks the padding).
void add_mask_rows(const char* fn, const at::Tensor& mask, const at::Tensor& q, int64_t Nk,
                   DenseBias& bias) {
  const int64_t B = q.size(0), Nq = q.size(2);
  check_cpu(fn, "mask", mask);
  check_dims(fn, "mask", mask, 3, "[W, Nq, Nk]");
  const int64_t W = mask.size(0);
  TORCH_CHECK(W >= 1 && mask.size(1) == Nq && mask.size(2) == Nk, fn, ": mask must have shape [W, Nq=",
              Nq, ", Nk=", Nk, "] with W >= 1, got ", mask.sizes());
  TORCH_CHECK(B % W == 0, fn, ": q.shape[0] (B) must be a multiple of the mask's window count W=", W,
              ", got ", B);
  check_param_dtype(fn, "mask", mask, q.scalar_type(), "q");
  const int64_t ld = bias.ld;
  const at::Tensor m = mask.to(at::kFloat).contiguous();
  bias.mask_rows = at::zeros({W, Nq, ld}, q.options().dtype(at::kFloat));
  bias.mask_rows.narrow(2, 0, Nk).copy_(m);
  bias.mask_windows = W;
}

DenseBias dense_table_bias(const char* fn, const std::optional<at::Tensor>& table_opt,
                           const std::optional<at::Tensor>& index_opt, const at::Tensor& q,
                           int64_t Nk) {
  const int64_t H = q.size(1), Nq = q.size(2);
  DenseBias bias;
  bias.ld = round_up(Nk, kBiasRowAlign);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  if (!table_opt.has_value() || !table_opt->defined()) {
    bias.rows = at::empty({bias.ld}, q.options().dtype(at::kFloat));
    float* row = bias.rows.data_ptr<float>();
    for (int64_t j = 0; j < bias.ld; ++j) row[j] = j < Nk ? 0.0f : neg_inf;
    return bias;
  }

  const at::Tensor& table = *table_opt;
  check_cpu(fn, "table", table);
  check_dims(fn, "table", table, 2, "[H, T]");
  TORCH_CHECK(table.size(0) == H, fn, ": table.shape[0] must be H = ", H, " (from q), got shape ",
              table.sizes());
  TORCH_CHECK(table.size(1) >= 1 && table.size(1) <= std::numeric_limits<int32_t>::max(), fn,
              ": table.shape[1] (T) must be in [1, 2^31), got shape ", table.sizes());
  check_param_dtype(fn, "table", table, q.scalar_type(), "q");
  TORCH_CHECK(index_opt.has_value() && index_opt->defined(), fn,
              ": index [Nq, Nk] is required when table is given");
  const at::Tensor& index = *index_opt;
  check_cpu(fn, "index", index);
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, fn,
              ": index must be int64 or int32, got ", index.scalar_type());
  check_shape(fn, "index", index, {Nq, Nk}, "[Nq, Nk]");

  bias.T = table.size(1);
  bias.index32 = at::empty({Nq, Nk}, index.options().dtype(at::kInt));
  int32_t* idx = bias.index32.data_ptr<int32_t>();
  if (index.scalar_type() == at::kLong)
    convert_index<int64_t>(index, bias.T, idx);
  else
    convert_index<int32_t>(index, bias.T, idx);

  const at::Tensor tab = table.to(at::kFloat).contiguous();
  const float* tp = tab.data_ptr<float>();
  bias.rows = at::empty({H, Nq, bias.ld}, q.options().dtype(at::kFloat));
  float* rows = bias.rows.data_ptr<float>();
  const int64_t T = bias.T, ld = bias.ld;
  // Threads only pay off beyond ~64K gathered elements (waking them costs microseconds).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, Nk));
  at::parallel_for(0, H * Nq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* t = tp + (r / Nq) * T;
      const int32_t* ix = idx + (r % Nq) * Nk;
      float* out = rows + r * ld;
      for (int64_t j = 0; j < Nk; ++j) out[j] = t[ix[j]];
      for (int64_t j = Nk; j < ld; ++j) out[j] = neg_inf;
    }
  });
  bias.i_stride = ld;
  bias.h_stride = Nq * ld;
  return bias;
}

DenseBias dense_bias(const char* fn, const std::optional<at::Tensor>& table_opt,
                     const std::optional<at::Tensor>& index_opt,
                     const std::optional<at::Tensor>& mask_opt, const at::Tensor& q, int64_t Nk) {
  DenseBias bias = dense_table_bias(fn, table_opt, index_opt, q, Nk);
  if (given(mask_opt)) add_mask_rows(fn, *mask_opt, q, Nk, bias);
  return bias;
}

// A model's bias table and index are constant at inference: gathering and checking them on every
// call would redo the same work. The dense bias is kept per (table, index) and reused while both
// tensors are the same objects, at the same addresses and versions (every in-place update, an
// optimizer step included, bumps a tensor's version; writes through `.data` bypass it, as they
// bypass autograd). Inference tensors have no version counter and are never cached.
class DenseBiasCache {
 public:
  DenseBias get(const char* fn, const std::optional<at::Tensor>& table,
                const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& mask,
                const at::Tensor& q, int64_t Nk) {
    const std::vector<at::Tensor> inputs = given_tensors({&table, &index, &mask});
    bool cacheable = given(table) || given(mask);
    for (const at::Tensor& t : inputs) cacheable = cacheable && !t.is_inference();
    if (!cacheable) return dense_bias(fn, table, index, mask, q, Nk);
    const Key key = key_of(inputs, q, Nk);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_)
        if (e.key == key && alive(e)) return e.bias;
    }
    DenseBias bias = dense_bias(fn, table, index, mask, q, Nk);  // checks, and throws on bad input
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());
    Entry entry{key, {}, bias};
    for (const at::Tensor& t : inputs) entry.tensors.emplace_back(t.getIntrusivePtr());
    entries_.push_back(std::move(entry));
    return bias;
  }

 private:
  // Per given tensor (table, index, mask, in order; absent ones left out: the TensorImpls tell
  // them apart): its TensorImpl, data pointer and version; then B mod W, H, Nq, Nk.
  using Key = std::vector<int64_t>;
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Key key;
    std::vector<WeakImpl> tensors;  // a freed tensor's address may be reused: the entry then expires
    DenseBias bias;
  };
  static constexpr size_t kMaxEntries = 64;  // a few dozen attention layers per model

  static std::vector<at::Tensor> given_tensors(
      std::initializer_list<const std::optional<at::Tensor>*> ts) {
    std::vector<at::Tensor> out;
    for (const auto* t : ts)
      if (given(*t)) out.push_back(**t);
    return out;
  }

  static Key key_of(const std::vector<at::Tensor>& inputs, const at::Tensor& q, int64_t Nk) {
    Key key;
    for (const at::Tensor& t : inputs) {
      key.push_back(reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()));
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      key.push_back(t._version());
    }
    // With a mask, B mod W (a cached entry has passed the check that it is 0).
    const int64_t b_mod_w = inputs.back().dim() == 3 && inputs.back().size(0) > 0
                                ? q.size(0) % inputs.back().size(0) : 0;
    key.insert(key.end(), {b_mod_w, q.size(1), q.size(2), Nk});
    return key;
  }

  static bool alive(const Entry& e) {
    for (const WeakImpl& t : e.tensors)
      if (t.expired()) return false;
    return true;
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

DenseBias cached_dense_bias(const char* fn, const std::optional<at::Tensor>& table,
                            const std::optional<at::Tensor>& index,
                            const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t Nk) {
  static DenseBiasCache cache;
  return cache.get(fn, table, index, mask, q, Nk);
}

// The part of the kernel arguments forward and backward share.
void fill_inputs(BiasAttentionInputs& a, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const DenseBias& bias, Activation act, double scale) {
  a.B = q.size(0); a.H = q.size(1); a.Nq = q.size(2); a.Nk = k.size(2);
  a.Dk = q.size(3); a.Dv = v.size(3);
  a.dtype = elem_type(q.scalar_type());
  a.activation = act;
  a.scale = static_cast<float>(scale);
  a.q = q.data_ptr(); copy_strides(q, a.q_stride);
  a.k = k.data_ptr(); copy_strides(k, a.k_stride);
  a.v = v.data_ptr(); copy_strides(v, a.v_stride);
  a.bias = bias.rows.data_ptr<float>();
  a.bias_h_stride = bias.h_stride; a.bias_i_stride = bias.i_stride; a.bias_ld = bias.ld;
  a.mask = bias.mask_rows.defined() ? bias.mask_rows.data_ptr<float>() : nullptr;
  a.mask_windows = bias.mask_windows;
  a.mask_w_stride = bias.mask_rows.defined() ? bias.mask_rows.stride(0) : 0;
}

// ---------------------------------------------------------------------------------------------
// Work split (the forward's is attention_query_block() of ops/common.h)
// ---------------------------------------------------------------------------------------------

// Backward tasks are (chunk of batches, h): dk / dv rows have one owner, and dS is summed over the
// chunk before its scatter into dtable (a scalar loop, the cost that chunks amortise). Chunks
// aim at kBackwardTasks tasks and depend only on the shapes, never on the thread count, so
// dtable is reproducible bit for bit. Queries go in blocks of kBackwardQueryBlock rows, so that
// P / dS for a block stay in L1 / L2.
constexpr int64_t kBackwardTasks = 64;
constexpr int64_t kBackwardQueryBlock = 32;

int64_t backward_batch_chunk(int64_t B, int64_t H, bool has_table) {
  if (!has_table) return 1;
  return std::max<int64_t>(1, std::min(B, B * H / kBackwardTasks));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& mask, double scale, const std::string& activation,
    bool save_pre_activation) {
  constexpr const char* fn = "bias_attention_forward";
  check_qkv(fn, q, k, v);
  const Activation act = parse_activation(fn, activation);
  check_scale(fn, scale);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  const int64_t Nk = k.size(2), Dv = v.size(3);

  at::Tensor out = empty_bhnd(B, H, Nq, Dv, q.options());
  at::Tensor o_pre = act != Activation::kNone && save_pre_activation
                         ? empty_bhnd(B, H, Nq, Dv, q.options())
                         : at::empty({0}, q.options());
  at::Tensor lse = poisoned(at::empty({B, H, Nq}, q.options().dtype(at::kFloat)));
  if (B * H * Nq == 0) return {out, o_pre, lse};

  const DenseBias bias = cached_dense_bias(fn, table, index, mask, q, Nk);

  BiasAttentionFwdArgs a{};
  fill_inputs(a, q, k, v, bias, act, scale);
  a.out = out.data_ptr(); copy_strides(out, a.out_stride);
  if (o_pre.numel() > 0) {
    a.o_pre = o_pre.data_ptr(); copy_strides(o_pre, a.o_pre_stride);
  }
  a.lse = lse.data_ptr<float>(); copy_strides(lse, a.lse_stride);
  a.q_block = attention_query_block(B * H, Nq);
  a.q_blocks = (Nq + a.q_block - 1) / a.q_block;

  run_tasks(&KernelTable::bias_attention_forward, a, B * H * a.q_blocks);
  return {out, o_pre, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& mask, const at::Tensor& o_pre, const at::Tensor& lse,
    double scale, const std::string& activation) {
  constexpr const char* fn = "bias_attention_backward";
  check_qkv(fn, q, k, v);
  const Activation act = parse_activation(fn, activation);
  check_scale(fn, scale);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dk = q.size(3);
  const int64_t Nk = k.size(2), Dv = v.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out},
                                std::pair<const char*, const at::Tensor&>{"o_pre", o_pre}}) {
    check_cpu_4d(fn, name, t);
    check_dtype(fn, name, t, q.scalar_type(), "q");
    check_size(fn, name, t, 0, B, "B, from q");
    check_size(fn, name, t, 1, H, "H, from q");
    check_size(fn, name, t, 2, Nq, "Nq, from q");
    check_size(fn, name, t, 3, Dv, "Dv, from v");
  }
  check_defined_on_cpu(fn, "lse", lse);
  check_float32(fn, "lse", lse);
  check_shape(fn, "lse", lse, {B, H, Nq}, "[B, H, Nq]");

  at::Tensor dq = empty_bhnd(B, H, Nq, Dk, q.options());
  at::Tensor dk = empty_bhnd(B, H, Nk, Dk, q.options());
  at::Tensor dv = empty_bhnd(B, H, Nk, Dv, q.options());
  const DenseBias bias = cached_dense_bias(fn, table, index, mask, q, Nk);
  const bool has_table = bias.index32.defined();
  const int64_t b_chunk = backward_batch_chunk(B, H, has_table);
  const int64_t chunks = (B + b_chunk - 1) / b_chunk;
  at::Tensor partial = has_table ? at::zeros({chunks, H, 2, bias.T}, q.options().dtype(at::kFloat))
                                 : at::Tensor();
  if (B * H > 0) {
    BiasAttentionBwdArgs a{};
    fill_inputs(a, q, k, v, bias, act, scale);
    a.grad_out = grad_out.data_ptr(); copy_strides(grad_out, a.grad_out_stride);
    a.o_pre = o_pre.data_ptr(); copy_strides(o_pre, a.o_pre_stride);
    if (has_table) {
      a.index = bias.index32.data_ptr<int32_t>();
      a.T = bias.T;
      a.dtable_partial = partial.data_ptr<float>();
    }
    a.dq = dq.data_ptr(); copy_strides(dq, a.dq_stride);
    a.dk = dk.data_ptr(); copy_strides(dk, a.dk_stride);
    a.dv = dv.data_ptr(); copy_strides(dv, a.dv_stride);
    a.b_chunk = b_chunk;
    a.q_block = kBackwardQueryBlock;
    run_tasks(&KernelTable::bias_attention_backward, a, chunks * H);
  }
  if (!has_table) return {dq, dk, dv, at::empty({0}, q.options())};

  // dtable = the sum of the per-task partials (two interleaved rows each), chunk by chunk in
  // order: deterministic for any thread count.
  at::Tensor dtable32 = poisoned(at::empty({H, bias.T}, q.options().dtype(at::kFloat)));
  const float* part = partial.data_ptr<float>();
  float* dt = dtable32.data_ptr<float>();
  const int64_t T = bias.T;
  at::parallel_for(0, H * T, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t h = x / T, r = x % T;
      float s = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* row = part + ((c * H + h) * 2) * T;
        s += row[r] + row[T + r];
      }
      dt[x] = s;
    }
  });
  return {dq, dk, dv, dtable32.to(table->scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Autograd (ops/autograd.h; the Python backends' twin is in fastvit_kernels/ops/bias_attention.py)
// ---------------------------------------------------------------------------------------------

class BiasAttentionFunction : public torch::autograd::Function<BiasAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const std::optional<at::Tensor>& table,
      const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& mask, double scale,
      const std::string& activation, bool save_pre_activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<decltype(bias_attention_forward)>("fastvit_kernels::bias_attention_forward");
    auto [out, o_pre, lse] = op.call(q, k, v, table, index, mask, scale, activation, save_pre_activation);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["activation"] = activation;
    // With no activation, the output itself is the pre-activation output.
    ctx->save_for_backward({q, k, v, table.value_or(at::Tensor()), index.value_or(at::Tensor()),
                            mask.value_or(at::Tensor()), activation == "none" ? out : o_pre, lse});
    ctx->mark_non_differentiable({o_pre, lse});
    ctx->set_materialize_grads(false);  // backward fills a missing output gradient itself
    return {out, o_pre, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &o_pre = saved[6];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    // sym_numel: under torch.compile the sizes may be symbolic.
    TORCH_CHECK(activation == "none" || o_pre.sym_numel() > 0,
                "bias_attention: backward needs the pre-activation output, which was not saved "
                "because no input required grad when the forward ran");
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(o_pre);
    const std::optional<at::Tensor> table = saved[3].defined() ? std::optional(saved[3]) : std::nullopt;
    const std::optional<at::Tensor> index = saved[4].defined() ? std::optional(saved[4]) : std::nullopt;
    const std::optional<at::Tensor> mask = saved[5].defined() ? std::optional(saved[5]) : std::nullopt;
    static const auto op = native_op<decltype(bias_attention_backward)>("fastvit_kernels::bias_attention_backward");
    auto [dq, dk, dv, dtable] = op.call(grad_out, q, k, v, table, index, mask, o_pre, saved[7],
                                        ctx->saved_data["scale"].toDouble(), activation);
    return {dq, dk, dv, table ? dtable : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
    const std::optional<at::Tensor>& mask, double scale, const std::string& activation,
    bool save_pre_activation) {
  auto out = BiasAttentionFunction::apply(q, k, v, table, index, mask, scale, activation,
                                          save_pre_activation);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvit_kernels

// ---------------------------------------------------------------------------------------------
// Registration: torch.ops.fastvit_kernels.bias_attention_forward / _backward, the C++ CPU kernels of the
// op and their autograd (the Autograd section above); the fake (meta) implementations are registered by
// fastvit_kernels/ops/bias_attention.py.
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(fastvit_kernels, m) {
  m.set_python_module("fastvit_kernels.ops.bias_attention");  // registers the fake implementations
  // -> (out [B,H,Nq,Dv] over [B,Nq,H,Dv] memory, o_pre (same, or 0-element), lse [B,H,Nq] fp32)
  m.def("bias_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? index, "
        "Tensor? mask, float scale, str activation, bool save_pre_activation) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (dq, dk, dv over [B,N,H,D] memory, dtable [H,T] in table's dtype or 0-element)
  m.def("bias_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? table, "
        "Tensor? index, Tensor? mask, Tensor o_pre, Tensor lse, float scale, str activation) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit_kernels, CPU, m) {
  m.impl("bias_attention_forward", &fastvit_kernels::cpu::bias_attention_forward);
  m.impl("bias_attention_backward", &fastvit_kernels::cpu::bias_attention_backward);
}

TORCH_LIBRARY_IMPL(fastvit_kernels, Autograd, m) {
  m.impl("bias_attention_forward", &fastvit_kernels::cpu::bias_attention_forward_autograd);
}
