"""Swin, TinyViT, EfficientFormer, EfficientViT-MSRA: the op at their attention shapes, and the
models end to end, patched against timm and torch.compile.

Op part (`--part op`): for each family's attention calls at 224x224 (SHAPES below, checked
against the models by `verify_shapes`), forward and forward+backward, all in the same run:

  op       fastvit_kernels.ops.bias_attention (table, index, Swin's mask), heads merged (a free view)
  eager    the math as timm writes it: (q·scale) @ kᵀ + table[:, index] (+ mask per window),
           softmax, @ v, heads merged
  sdpa     F.scaled_dot_product_attention with bias (+ mask) materialised as attn_mask [B, H, N, N]
           (what timm's Swin does when its fused attention is on)
  compile  torch.compile of `eager`
  flex     torch.compile'd FlexAttention, score_mod = score + table[h, index[q, kv]] (+ mask[b % W])

The bias is gathered inside every timed call (timm's Swin gathers it per call; the others cache
it in eval mode, which makes their eager forward slightly cheaper than measured here). q, k and
v are the strided views each family's projection produces.

Model part (`--part model`): images/s of swin_tiny_patch4_window7_224, tiny_vit_5m_224,
efficientformer_l1 and efficientvit_m0 (random weights, randomised bias tables, layer scales and
BatchNorms): inference at batch 1 and 32 in float32 and bfloat16 (eager, patched, compile and
patched+compile), and a training step at batch 32 (float32 and bfloat16 autocast). Also, for
inference, `compile+freezing` (the unpatched model through `fastvit_kernels.compile_frozen`:
Inductor's freezing, weights as constants, and max-autotune GEMMs) and `serve`
(`fastvit_kernels.optimize_for_inference(model, dtype, compile=True)`: patched, then compiled the
same way — the recommended serving path). Every output is compared with eager float32
timm before it is timed (fastvit_kernels.bench.levit does the timing); `x timm compile` is each
row's img/s over the unpatched model's torch.compile at the same dtype and batch.

    python -m fastvit_kernels.bench.timm_families --part op --quick
    python -m fastvit_kernels.bench.timm_families --part model --models efficientvit_m0 --quick
"""

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.ops.bias_attention import select_backend
from fastvit_kernels.reference import bias_attention as reference

IMPLS = ("op", "eager", "sdpa", "compile", "flex")
PASSES = ("fwd", "fwd+bwd")
MODELS = ("swin_tiny_patch4_window7_224", "tiny_vit_5m_224", "efficientformer_l1", "efficientvit_m0")
INFER_IMPLS = ("eager", "patched", "compile", "patched+compile", "compile+freezing", "serve")
TRAIN_IMPLS = ("eager", "patched", "compile", "patched+compile")
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


# ---------------------------------------------------------------------------------------------
# Attention shapes at 224x224 (docs/patching.md, "Families")
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyShape:
    name: str  # e.g. "swin_t.s1.shift"
    model: str
    layout: str  # "swin" (qkv [B, N, 3, H, D]), "split" ([B, N, H, 2Dk+Dv]), "channels" (one head, [B, D, N])
    heads: int
    tokens: int  # N per window
    key_dim: int
    val_dim: int
    windows: int  # windows per image (the op's batch is images x windows)
    shifted: bool  # Swin's shifted windows: the mask joins
    count: int  # calls per image of this shape

    def describe(self) -> str:
        mask = f" mask W={self.windows}" if self.shifted else ""
        return f"H={self.heads} N={self.tokens} Dk={self.key_dim} Dv={self.val_dim} windows/img={self.windows}{mask}"


SHAPES = (
    FamilyShape("swin_t.s1", MODELS[0], "swin", 3, 49, 32, 32, 64, False, 1),
    FamilyShape("swin_t.s1.shift", MODELS[0], "swin", 3, 49, 32, 32, 64, True, 1),
    FamilyShape("swin_t.s2.shift", MODELS[0], "swin", 6, 49, 32, 32, 16, True, 1),
    FamilyShape("swin_t.s3.shift", MODELS[0], "swin", 12, 49, 32, 32, 4, True, 3),
    FamilyShape("swin_t.s4", MODELS[0], "swin", 24, 49, 32, 32, 1, False, 2),
    FamilyShape("tiny_vit_5m.s2", MODELS[1], "split", 4, 49, 32, 32, 16, False, 2),
    FamilyShape("tiny_vit_5m.s3", MODELS[1], "split", 5, 196, 32, 32, 1, False, 6),
    FamilyShape("tiny_vit_5m.s4", MODELS[1], "split", 10, 49, 32, 32, 1, False, 2),
    FamilyShape("efficientformer_l1.s4", MODELS[2], "split", 8, 49, 32, 128, 1, False, 1),
    FamilyShape("efficientvit_m0.s1", MODELS[3], "channels", 1, 49, 16, 16, 4, False, 4),
    FamilyShape("efficientvit_m0.s2", MODELS[3], "channels", 1, 49, 16, 32, 1, False, 8),
    FamilyShape("efficientvit_m0.s3", MODELS[3], "channels", 1, 16, 16, 48, 1, False, 12),
)
QUICK_SHAPES = ("swin_t.s1.shift", "tiny_vit_5m.s3", "efficientformer_l1.s4", "efficientvit_m0.s1")


def verify_shapes() -> List[str]:
    """Runs each model (patched, batch 1) recording every op call; returns the differences from SHAPES."""
    import timm

    from fastvit_kernels.modules import timm_attention
    from fastvit_kernels.patch import patch_timm

    problems = []
    real = timm_attention.bias_attention
    for model_name in sorted({s.model for s in SHAPES}):
        seen: Dict[tuple, int] = {}

        def record(q, k, v, table, index, mask=None, scale=None, **kw):
            key = (q.shape[1], q.shape[2], q.shape[3], v.shape[3], q.shape[0], mask is not None)
            seen[key] = seen.get(key, 0) + 1
            return real(q, k, v, table, index, mask=mask, scale=scale, **kw)

        model = patch_timm(timm.create_model(model_name, pretrained=False)).eval()
        timm_attention.bias_attention = record
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, 224, 224))
        finally:
            timm_attention.bias_attention = real
        ours = {(s.heads, s.tokens, s.key_dim, s.val_dim, s.windows, s.shifted): s.count
                for s in SHAPES if s.model == model_name}
        listed = {key: n for key, n in seen.items() if key in ours}
        if listed != ours:
            problems.append(f"{model_name}: the model calls {seen}, SHAPES lists {ours}")
    return problems


def swin_mask(windows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A mask like timm's shifted windows: 0 within a region, -100 across (random regions)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (windows, tokens), generator=g)
    return (labels[:, :, None] != labels[:, None, :]).float() * -100.0


def square_index(tokens: int) -> torch.Tensor:
    """Swin's relative-position index of a square window (any index serves the timing)."""
    w = int(round(tokens ** 0.5))
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (w - 1)
    return rel[0] * (2 * w - 1) + rel[1]


# ---------------------------------------------------------------------------------------------
# Implementations: f(q, k, v, table [H, T] view, index, mask, scale) -> [B, N, H·Dv]
# ---------------------------------------------------------------------------------------------


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _bias(table, index, mask, batch):
    """bias [H, N, N], plus the mask per window -> [B, H, N, N] (or [1, H, N, N])."""
    bias = table[:, index].unsqueeze(0)
    if mask is None:
        return bias
    W = mask.shape[0]
    return (bias.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(batch // W, -1, -1, -1, -1).reshape(
        batch, bias.shape[1], *mask.shape[1:])


def impl_op(q, k, v, table, index, mask, scale):
    return _merge_heads(bias_attention(q, k, v, table, index, mask=mask, scale=scale))


def impl_eager(q, k, v, table, index, mask, scale):
    B, H, N, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + table[:, index]
    if mask is not None:
        W = mask.shape[0]
        attn = (attn.view(-1, W, H, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, H, N, N)
    return _merge_heads(attn.softmax(dim=-1) @ v)


def impl_sdpa(q, k, v, table, index, mask, scale):
    attn_mask = _bias(table, index, mask, q.shape[0]).to(q.dtype)
    return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale))


def make_flex(table, index, mask):
    from torch.nn.attention.flex_attention import flex_attention

    W = mask.shape[0] if mask is not None else 1

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score + table[h, index[q_idx, kv_idx]]
        if mask is not None:
            score = score + mask[b % W, q_idx, kv_idx]
        return score

    def flex(q, k, v, table_, index_, mask_, scale):
        return _merge_heads(flex_attention(q, k, v, score_mod=score_mod, scale=scale))

    return torch.compile(flex, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Inputs (a case for common.bench_kernel_cases)
# ---------------------------------------------------------------------------------------------


class Case:
    def __init__(self, shape: FamilyShape, images: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.name = shape.name
        self.batch = images * shape.windows
        s, B = shape, self.batch
        g = torch.Generator().manual_seed(seed)

        def randn(*size):
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        if s.layout == "swin":
            self.buffers = [randn(B, s.tokens, 3, s.heads, s.key_dim)]
        elif s.layout == "split":
            self.buffers = [randn(B, s.tokens, s.heads, 2 * s.key_dim + s.val_dim)]
        else:  # q after its depthwise conv, k and v from the head's projection
            self.buffers = [randn(B, s.key_dim, s.tokens), randn(B, s.key_dim + s.val_dim, s.tokens)]
        side = int(round(s.tokens ** 0.5))
        T = (2 * side - 1) ** 2 if s.layout == "swin" else s.tokens
        # Swin stores the table [T, H]: the op reads it as a transposed view.
        self.table = 2 * (randn(T, s.heads) if s.layout == "swin" else randn(s.heads, T))
        self.index = (square_index(s.tokens) if s.layout == "swin" else torch.randint(0, T, (s.tokens, s.tokens), generator=g)).to(device)
        self.mask = swin_mask(s.windows, s.tokens).to(device=device, dtype=dtype) if s.shifted else None
        self.grad_out = randn(B, s.tokens, s.heads * s.val_dim)
        self.scale = s.key_dim ** -0.5

    def describe(self) -> str:
        return f"B={self.batch} {self.shape.describe()} {common.dtype_name(self.dtype)}"

    def row_fields(self) -> Dict[str, object]:
        s = self.shape
        return dict(case=s.name, model=s.model, B=self.batch, H=s.heads, N=s.tokens, Dk=s.key_dim,
                    Dv=s.val_dim, mask=s.shifted, dtype=common.dtype_name(self.dtype))

    def table_view(self, table):
        return table.t() if self.shape.layout == "swin" else table

    def views(self, buffers):
        s = self.shape
        if s.layout == "swin":
            return buffers[0].permute(2, 0, 3, 1, 4).unbind(0)
        if s.layout == "split":
            q, k, v = buffers[0].split([s.key_dim, s.key_dim, s.val_dim], dim=3)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = buffers[1].split([s.key_dim, s.val_dim], dim=1)
        return tuple(t.unsqueeze(1).transpose(2, 3) for t in (buffers[0], k, v))

    def backend(self) -> str:
        q, k, v = self.views(self.buffers)
        return select_backend(q, k, v, self.table_view(self.table), self.index, self.mask).name

    def floor_bytes(self, pass_: str) -> int:
        return 0

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_(need_grads) for t in self.buffers + [self.table]]
        mask = self.mask.to(dtype) if self.mask is not None else None
        with torch.set_grad_enabled(need_grads):
            q, k, v = self.views(leaves[:-1])
            out = _merge_heads(reference.bias_attention(q, k, v, self.table_view(leaves[-1]), self.index,
                                                        self.scale, None, mask))
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.to(dtype)))

    def make_callable(self, impl: str, pass_: str):
        leaves = common.pass_leaves(pass_, self.buffers + [self.table])
        buffers, table = leaves[:-1], leaves[-1]
        if impl == "compile":
            f = torch.compile(impl_eager, dynamic=False)
        elif impl == "flex":
            f = make_flex(self.table_view(table), self.index, self.mask)
        else:
            f = {"op": impl_op, "eager": impl_eager, "sdpa": impl_sdpa}[impl]

        def call():
            q, k, v = self.views(buffers)
            return f(q, k, v, self.table_view(table), self.index, self.mask, self.scale)

        return common.pass_runner(pass_, call, leaves, self.grad_out)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """timm model with random weights and randomised bias tables, layer scales and BatchNorms
    (timm zero-initialises some of them), eval mode."""
    import timm

    from fastvit_kernels.bench.levit import randomize_levit_

    torch.manual_seed(seed)
    model = randomize_levit_(timm.create_model(name, pretrained=False), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("relative_position_bias_table"):
                p.copy_(2.0 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("gamma"):
                p.copy_(0.5 * (1 + 0.1 * torch.randn(p.shape, generator=gen)))
    return model.eval()


def run_models(ctx: common.Context) -> List[Dict]:
    from fastvit_kernels.bench import levit

    args = ctx.args
    rows: List[Dict] = []
    dtypes = [common.DTYPES[d] for d in args.dtypes]
    for name in args.models:
        base = build_model(name)
        for dtype in dtypes:
            for batch in args.batches:
                if "infer" in args.passes_model:
                    rows += levit.bench_inference(base, name, batch=batch, dtype=dtype, device=ctx.device,
                                                  env=ctx.env, quick=ctx.quick, impls=args.infer_impls)
            if "train" in args.passes_model:
                rows += levit.bench_training(base, name, batch=args.train_batch, dtype=dtype, device=ctx.device,
                                             env=ctx.env, quick=ctx.quick, impls=TRAIN_IMPLS)
    for row in rows:  # the peer of the targets: the unpatched model's torch.compile
        peer = next((r for r in rows if r["case"] == row["case"] and r["pass"] == row["pass"]
                     and r["B"] == row["B"] and r["dtype"] == row["dtype"] and r["impl"] == "compile"), None)
        if peer is not None and peer.get("img_per_s") and row.get("img_per_s"):
            row["x_timm_compile"] = row["img_per_s"] / peer["img_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--part", choices=("op", "model"), default="op")
    parser.add_argument("--shapes", nargs="+", help=f"op part: names or substrings (all: {' '.join(s.name for s in SHAPES)})")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model part: timm names")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="model part")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="model part: inference batches")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--passes-model", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--infer-impls", nargs="+", choices=INFER_IMPLS, default=list(INFER_IMPLS))
    parser.add_argument("--no-verify", action="store_true", help="skip checking SHAPES against the models")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    if args.part == "model":
        return run_models(ctx)
    if not args.no_verify:
        problems = verify_shapes()
        if problems:
            raise SystemExit("the shape table disagrees with timm:\n" + "\n".join(problems))
    shapes = common.select_by_name(SHAPES, args.shapes or (QUICK_SHAPES if args.quick else None))
    cases = (Case(shape, ctx.batch, ctx.dtype, ctx.device) for shape in shapes)
    rows = common.bench_kernel_cases(cases, args.impls, args.passes, ctx.env, quick=ctx.quick)
    common.add_ratios(rows, "op")
    return rows


def report(rows: List[Dict], ctx: common.Context) -> str:
    if ctx.args.part == "op":
        return common.kernel_table(rows)
    columns = [common.Column("case", "model"), common.Column("pass", "pass"), common.Column("dtype", "dtype"),
               common.Column("B", "B"), common.Column("impl", "impl"), common.Column("img_per_s", "img/s", "{:.1f}"),
               common.Column("x_timm_compile", "x timm compile", "{:.2f}"), common.Column("max_rel_err", "rel err", "{:.1e}")]
    return common.format_table(rows, columns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_timm_families", batch=(16, 64), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       batch_help="op part: images per batch (the op's batch is images x windows; default 16)",
                       quick_help=f"op part: shapes {' '.join(QUICK_SHAPES)}; short timings")


if __name__ == "__main__":
    sys.exit(main())
