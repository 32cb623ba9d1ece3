"""DynamicViT on timm DeiT / ViT backbones (Rao et al., NeurIPS 2021; docs/policy_attention.md and docs/varlen_attention.md, "Shapes in real models").

A re-implementation of raoyongming/DynamicViT `VisionTransformerDiffPruning` on top of timm's
`VisionTransformer`: every block is a `DynamicBlock` (a timm `Block` whose forward also takes
`policy` / `cu_seqlens`) whose attention is `fastvit_kernels.MaskedTokenAttention`. The parameter
names are timm's, so a plain timm DeiT/ViT state_dict loads as the backbone (`load_backbone`), and
the score predictors are named as in the original (`score_predictor.{i}.in_conv.*`,
`score_predictor.{i}.out_conv.*`), so an original DynamicViT checkpoint loads too.

Pruning. Before block `pruning_loc[s]` a `PredictorLG` scores the patch tokens (cls excluded):
LayerNorm -> Linear -> GELU, then the first half of the channels stays per token ("local") and the
second half is replaced by its policy-weighted mean over the image's kept tokens ("global"), then
Linear(C, C/2) -> GELU -> Linear(C/2, C/4) -> GELU -> Linear(C/4, 2) -> LogSoftmax: column 0 is the
log-probability of keeping the token. DeiT-S default (`dynamicvit_deit_small`): prune before blocks
3, 6, 9 keeping int(196 * r) patch tokens for r = 0.7, 0.49, 0.343: 197 -> 138 -> 97 -> 68 tokens.

Three ways to run (the mode is picked by `model.training` and `keep_mode`):

    training (model.train())
        The original's: all tokens stay; the keep decision of stage s is
        `F.gumbel_softmax(pred, hard=True)[..., 0:1] * prev_decision` (straight-through, so it
        carries a gradient), the policy [B, 1 + N, 1] (cls always 1) is passed to EVERY block's
        attention (an all-ones policy before the first stage, as in the original; with it the
        attention is `softmax_with_policy`, which differs from a softmax by ~eps). Returns
            (logits [B, num_classes], decisions)                      distill=False
            (logits, features [B, N, C], prev_decision.detach() [B, N, 1], decisions)   distill=True
        where decisions is the list of the stages' hard keep decisions, each [B, N] (N = the
        number of patch tokens) and features are the final-normed patch tokens, as the original.
        The Gumbel noise is injectable: forward(x, gumbel_noise=...) takes None (draw it with
        F.gumbel_softmax, as the original), a torch.Generator (draw from it), or a sequence of
        tensors, one per stage, each [B, N, 2] of Gumbel(0, 1) samples (`sample_gumbel_noise`).

    inference, keep_mode="topk" (the default, the paper's)
        Every image keeps the same count, int(N * token_ratio[s]) patch tokens with the highest
        keep scores (plus cls), gathered with a flat index on [B * n, C] in score order (cls
        first, then descending score); the blocks run on the dense shorter sequence (plain
        attention). Returns logits [B, num_classes].

    inference, keep_mode="threshold"
        Per-image counts: at stage s a patch token stays when its keep probability
        exp(pred[..., 0]) >= keep_threshold (0.5 by default: the argmax of the predictor, the
        noise-free version of the training decision); cls always stays; a dropped token stays
        dropped. The tokens of all images are packed into [T, C] (image b in rows
        cu_seqlens[b]:cu_seqlens[b + 1], cls first, the rest in their original order) and every
        block runs packed: LayerNorm / MLP on [T, C] directly, attention through
        MaskedTokenAttention's varlen path. The predictor's global half is the mean over the
        image's kept patch tokens. The head reads each image's cls row. Returns logits
        [B, num_classes]. keep_threshold=0 keeps every token (= the plain ViT).
    Set the mode with the constructor arguments `keep_mode` / `keep_threshold` or with
    `model.set_keep_mode("threshold", 0.6)`. Training ignores the mode.

`forward_features(x)` returns the final-normed tokens: [B, 1 + N, C] in training, [B, 1 + n, C]
for "topk", and `(tokens [T, C], cu_seqlens)` for "threshold".

No DynamicViT weights are downloadable here (`pretrained=True` raises): build the model, load a
timm DeiT state_dict with `model.load_backbone(timm.create_model("deit_small_patch16_224",
pretrained=True).state_dict())` and train the predictors (or load a DynamicViT checkpoint with
load_state_dict).
"""

import math
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvit_kernels.modules.masked_token_attention import MaskedTokenAttention
from fastvit_kernels.models._timm import attach_cfg, pop_timm_kwargs, register_with_timm

try:
    from timm.layers import trunc_normal_
    from timm.models.vision_transformer import Block, VisionTransformer
except Exception as _error:  # timm is required for this model (the package works without it)
    Block = VisionTransformer = None
    _TIMM_ERROR: Optional[BaseException] = _error
else:
    _TIMM_ERROR = None

__all__ = [
    "DynamicViT",
    "DynamicBlock",
    "PredictorLG",
    "batch_index_select",
    "gumbel_keep_decision",
    "sample_gumbel_noise",
    "dynamicvit_deit_small",
    "dynamicvit_deit_base",
]

KEEP_MODES = ("topk", "threshold")


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, C] (or [B, N]), idx [B, n] -> x[b, idx[b]] via one flat index on [B * N, C]."""
    B, N = x.shape[0], x.shape[1]
    flat = (idx + torch.arange(B, dtype=idx.dtype, device=x.device).view(B, 1) * N).reshape(-1)
    if x.dim() == 3:
        return x.reshape(B * N, x.shape[2])[flat].reshape(B, idx.shape[1], x.shape[2])
    return x.reshape(B * N)[flat].reshape(B, idx.shape[1])


def sample_gumbel_noise(shape, *, generator: Optional[torch.Generator] = None, dtype=None,
                        device=None) -> Tensor:
    """Gumbel(0, 1) samples drawn as F.gumbel_softmax draws them: -log(Exp(1))."""
    return -torch.empty(shape, dtype=dtype, device=device).exponential_(generator=generator).log()


def gumbel_keep_decision(pred_score: Tensor, noise: Optional[Tensor] = None) -> Tensor:
    """`F.gumbel_softmax(pred_score, hard=True)[..., 0:1]`, with the given Gumbel noise when
    noise is not None (the same arithmetic as F.gumbel_softmax with tau = 1)."""
    if noise is None:
        return F.gumbel_softmax(pred_score, hard=True)[..., 0:1]
    if noise.shape != pred_score.shape:
        raise ValueError(f"gumbel noise must have the scores' shape {tuple(pred_score.shape)}, "
                         f"got {tuple(noise.shape)}")
    y_soft = (pred_score + noise.to(pred_score.dtype)).softmax(dim=-1)
    index = y_soft.max(dim=-1, keepdim=True)[1]
    y_hard = torch.zeros_like(pred_score).scatter_(-1, index, 1.0)
    return (y_hard - y_soft.detach() + y_soft)[..., 0:1]


class PredictorLG(nn.Module):
    """DynamicViT's token score network (local + global features -> 2 log-probabilities).

    forward(x [B, N, C], policy [B, N, 1]) -> [B, N, 2] log-softmax (column 0: keep), the global
    half being the policy-weighted mean (0 where the policy is all zero: the original's NaN);
    forward_packed(x [T, C], segment [T], num_images) the same for packed tokens, the global
    half being each image's mean over its rows."""

    def __init__(self, embed_dim: int = 384, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_conv = nn.Sequential(
            nn.LayerNorm(embed_dim, **dd),
            nn.Linear(embed_dim, embed_dim, **dd),
            nn.GELU(),
        )
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2, **dd),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4, **dd),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2, **dd),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, : C // 2]
        kept = policy.sum(dim=1, keepdim=True)
        # An image whose patch tokens are all dropped gets 0 / 1 = 0 here, where the original
        # computes 0 / 0 = NaN (and the NaN spreads to the whole image); otherwise identical.
        kept = torch.where(kept == 0, torch.ones_like(kept), kept)
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / kept
        x = torch.cat([local_x, global_x.expand(B, N, C - C // 2)], dim=-1)
        return self.out_conv(x)

    def forward_packed(self, x: Tensor, segment: Tensor, num_images: int) -> Tensor:
        x = self.in_conv(x)
        C = x.shape[-1]
        g = x[:, C // 2:]
        sums = g.new_zeros(num_images, g.shape[1]).index_add_(0, segment, g)
        counts = torch.bincount(segment, minlength=num_images).clamp_(min=1).to(g.dtype)
        global_x = (sums / counts[:, None])[segment]
        return self.out_conv(torch.cat([x[:, : C // 2], global_x], dim=-1))


def _init_predictor(module: nn.Module) -> None:
    """The original's init: Linear weights trunc_normal(std .02), biases 0; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _require_timm() -> None:
    if _TIMM_ERROR is not None:
        raise ImportError(f"DynamicViT needs timm (import failed: {_TIMM_ERROR!r})")


if Block is not None:

    class DynamicBlock(Block):
        """timm's pre-norm ViT Block (same submodules and state_dict keys) whose forward also
        passes `policy` / `cu_seqlens` / `max_seqlen` to a MaskedTokenAttention. With cu_seqlens
        x is packed [T, C]; norms, layer scale and MLP work on it row-wise."""

        def forward(
            self,
            x: Tensor,
            attn_mask: Optional[Tensor] = None,
            is_causal: bool = False,
            *,
            policy: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None,
            max_seqlen: Optional[int] = None,
        ) -> Tensor:
            if policy is None and cu_seqlens is None:
                y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
            else:
                if not isinstance(self.attn, MaskedTokenAttention):
                    raise TypeError("DynamicBlock: policy / cu_seqlens need a MaskedTokenAttention, "
                                    f"this block's attention is {type(self.attn).__name__}")
                if cu_seqlens is not None and self.training and any(
                        getattr(d, "drop_prob", 0.0) > 0 for d in (self.drop_path1, self.drop_path2)):
                    raise ValueError("DynamicBlock: drop path on packed tokens (cu_seqlens) would drop "
                                     "single tokens, not images; use eval() or drop_path_rate=0")
                y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal,
                              policy=policy, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            x = x + self.drop_path1(self.ls1(y))
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            return x

    _Base = VisionTransformer
else:  # pragma: no cover - timm missing
    DynamicBlock = None
    _Base = nn.Module


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


GumbelNoise = Union[None, torch.Generator, Sequence[Tensor]]


class DynamicViT(_Base):
    """DynamicViT (VisionTransformerDiffPruning) as a timm VisionTransformer subclass.

    Args:
        pruning_loc: indices of the blocks before which tokens are pruned (strictly increasing).
        token_ratio: keep ratio of the patch tokens at each pruning stage (of the initial count:
            int(num_patches * ratio) kept; the counts must not increase).
        distill: training also returns the features and the last decision (the original's
            distillation outputs).
        keep_mode: inference pruning, "topk" (fixed ratio, the paper's) or "threshold".
        keep_threshold: keep-probability threshold of "threshold" mode, in [0, 1].
        **kwargs: timm VisionTransformer arguments (img_size, patch_size, embed_dim, depth,
            num_heads, mlp_ratio, qkv_bias, num_classes, drop rates, norm_layer, ...). Not
            supported: block_fn / attn_layer (fixed), no class token, register tokens,
            global_pool other than "token", dynamic_img_size, patch_drop_rate.
    """

    def __init__(
        self,
        *,
        pruning_loc: Sequence[int] = (3, 6, 9),
        token_ratio: Sequence[float] = (0.7, 0.49, 0.343),
        distill: bool = False,
        keep_mode: str = "topk",
        keep_threshold: float = 0.5,
        **kwargs,
    ) -> None:
        _require_timm()
        for name in ("block_fn", "attn_layer"):
            if name in kwargs:
                raise ValueError(f"DynamicViT: {name} is fixed (DynamicBlock / MaskedTokenAttention)")
        unsupported = {
            "class_token": (True, "DynamicViT needs the class token"),
            "reg_tokens": (0, "register tokens are not supported"),
            "global_pool": ("token", "DynamicViT classifies from the class token"),
            "dynamic_img_size": (False, "dynamic_img_size is not supported"),
            "patch_drop_rate": (0.0, "patch_drop_rate is not supported"),
        }
        for name, (allowed, why) in unsupported.items():
            if name in kwargs and kwargs[name] != allowed:
                raise ValueError(f"DynamicViT: {name}={kwargs[name]!r} unsupported ({why})")
        super().__init__(block_fn=DynamicBlock, attn_layer=MaskedTokenAttention, **kwargs)

        depth = len(self.blocks)
        pruning_loc = [int(i) for i in pruning_loc]
        token_ratio = [float(r) for r in token_ratio]
        if len(pruning_loc) != len(token_ratio):
            raise ValueError(f"DynamicViT: pruning_loc ({pruning_loc}) and token_ratio ({token_ratio}) "
                             "must have the same length")
        if any(b <= a for a, b in zip(pruning_loc[:-1], pruning_loc[1:])) or \
                any(not 0 <= i < depth for i in pruning_loc):
            raise ValueError(f"DynamicViT: pruning_loc must be strictly increasing block indices in "
                             f"[0, {depth}), got {pruning_loc}")
        self.num_patches = self.patch_embed.num_patches
        keep = [int(self.num_patches * r) for r in token_ratio]
        if any(not 0 < r <= 1 for r in token_ratio) or any(k < 1 for k in keep) or \
                any(b > a for a, b in zip(keep[:-1], keep[1:])):
            raise ValueError(f"DynamicViT: token_ratio must be in (0, 1], keep >= 1 token and not "
                             f"increase; got {token_ratio} -> {keep} of {self.num_patches} tokens")
        self.pruning_loc = pruning_loc
        self.token_ratio = token_ratio
        self.distill = bool(distill)
        self.keep_mode = "topk"
        self.keep_threshold = 0.5
        self.set_keep_mode(keep_mode, keep_threshold)

        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.score_predictor = nn.ModuleList(PredictorLG(self.embed_dim, **dd) for _ in pruning_loc)
        if self.cls_token.device.type != "meta":
            _init_predictor(self.score_predictor)

    # -----------------------------------------------------------------------------------------
    # Configuration

    def set_keep_mode(self, mode: str, threshold: Optional[float] = None) -> "DynamicViT":
        """Inference pruning: "topk" (fixed ratio) or "threshold" (keep probability >= threshold)."""
        if mode not in KEEP_MODES:
            raise ValueError(f"DynamicViT: keep_mode must be one of {KEEP_MODES}, got {mode!r}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"DynamicViT: keep_threshold must be a float in [0, 1], got {threshold!r}")
            self.keep_threshold = float(threshold)
        self.keep_mode = mode
        return self

    @property
    def keep_counts(self) -> List[int]:
        """Patch tokens kept after each pruning stage in "topk" inference."""
        return [int(self.num_patches * r) for r in self.token_ratio]

    def token_counts(self) -> List[int]:
        """Sequence length (cls included) of each stage in "topk" inference, e.g. DeiT-S:
        [197, 138, 97, 68]."""
        return [self.num_patches + 1] + [k + 1 for k in self.keep_counts]

    def load_backbone(self, state_dict: Mapping[str, Tensor]) -> List[str]:
        """Load a timm ViT/DeiT state_dict (e.g. `timm.create_model("deit_small_patch16_224")
        .state_dict()`, or a DeiT checkpoint {"model": ...}). Every backbone parameter must be
        present and nothing else may be; only the score predictors may be missing (they are
        left as they are). Returns the missing predictor keys."""
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("score_predictor.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                "DynamicViT.load_backbone: the state_dict does not match the backbone: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected "
                f"{list(result.unexpected_keys)[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}")
        return list(result.missing_keys)

    # -----------------------------------------------------------------------------------------
    # Forward

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if x.shape[1] != self.num_patches + 1:
            raise ValueError(f"DynamicViT: expected {self.num_patches} patch tokens, got {x.shape[1] - 1}")
        return x

    def _noise(self, gumbel_noise: GumbelNoise, stage: int, pred: Tensor) -> Optional[Tensor]:
        if gumbel_noise is None:
            return None
        if isinstance(gumbel_noise, torch.Generator):
            return sample_gumbel_noise(pred.shape, generator=gumbel_noise, dtype=pred.dtype, device=pred.device)
        if len(gumbel_noise) != len(self.pruning_loc):
            raise ValueError(f"DynamicViT: gumbel_noise must hold one tensor per pruning stage "
                             f"({len(self.pruning_loc)}), got {len(gumbel_noise)}")
        return gumbel_noise[stage]

    def _features_train(self, x: Tensor, gumbel_noise: GumbelNoise):
        x = self._embed(x)
        B, n = x.shape[0], self.num_patches
        prev_decision = torch.ones(B, n, 1, dtype=x.dtype, device=x.device)
        policy = torch.ones(B, n + 1, 1, dtype=x.dtype, device=x.device)
        cls_policy = torch.ones(B, 1, 1, dtype=x.dtype, device=x.device)
        decisions = []
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                pred = self.score_predictor[stage](x[:, 1:], prev_decision).reshape(B, -1, 2)
                hard = gumbel_keep_decision(pred, self._noise(gumbel_noise, stage, pred)) * prev_decision
                decisions.append(hard.reshape(B, n))
                policy = torch.cat([cls_policy, hard], dim=1)
                prev_decision = hard
                stage += 1
            x = blk(x, policy=policy)
        return self.norm(x), decisions, prev_decision

    def _features_topk(self, x: Tensor) -> Tensor:
        x = self._embed(x)
        B = x.shape[0]
        prev_decision = torch.ones(B, self.num_patches, 1, dtype=x.dtype, device=x.device)
        cls_index = torch.zeros(B, 1, dtype=torch.long, device=x.device)
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                pred = self.score_predictor[stage](x[:, 1:], prev_decision).reshape(B, -1, 2)
                keep = torch.topk(pred[:, :, 0], self.keep_counts[stage], dim=1, sorted=True).indices
                x = batch_index_select(x, torch.cat([cls_index, keep + 1], dim=1))
                prev_decision = batch_index_select(prev_decision, keep)
                stage += 1
            x = blk(x)
        return self.norm(x)

    def _features_threshold(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self._embed(x)
        B, N0, C = x.shape
        device = x.device
        x = x.reshape(B * N0, C)
        segment = torch.arange(B, device=device).repeat_interleave(N0)
        is_cls = torch.zeros(B * N0, dtype=torch.bool, device=device)
        is_cls[::N0] = True
        cu_seqlens = torch.arange(B + 1, device=device, dtype=torch.int64) * N0
        max_seqlen = N0
        log_threshold = math.log(self.keep_threshold) if self.keep_threshold > 0 else -math.inf
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                patch = ~is_cls
                keep = is_cls.clone()
                if log_threshold > -math.inf:
                    if bool(patch.any()):
                        pred = self.score_predictor[stage].forward_packed(x[patch], segment[patch], B)
                        keep[patch] = pred[:, 0] >= log_threshold
                    x, segment, is_cls = x[keep], segment[keep], is_cls[keep]
                    lengths = torch.bincount(segment, minlength=B)
                    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                    max_seqlen = int(lengths.max())
                stage += 1
            x = blk(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.norm(x), cu_seqlens

    def forward_features(self, x: Tensor, *, gumbel_noise: GumbelNoise = None):
        """Final-normed tokens: [B, 1 + N, C] (training), [B, 1 + n, C] ("topk"),
        (packed [T, C], cu_seqlens [B + 1]) ("threshold")."""
        if self.training:
            return self._features_train(x, gumbel_noise)[0]
        if self.keep_mode == "threshold":
            return self._features_threshold(x)
        return self._features_topk(x)

    def _head_from_cls(self, cls: Tensor) -> Tensor:
        return self.head(self.head_drop(self.fc_norm(cls)))

    def forward(self, x: Tensor, gumbel_noise: GumbelNoise = None):
        """Training: (logits, decisions) or, with distill, (logits, features, prev_decision,
        decisions); inference: logits. See the module docstring."""
        if self.training:
            tokens, decisions, prev_decision = self._features_train(x, gumbel_noise)
            logits = self.forward_head(tokens)
            if self.distill:
                return logits, tokens[:, 1:], prev_decision.detach(), decisions
            return logits, decisions
        if self.keep_mode == "threshold":
            tokens, cu_seqlens = self._features_threshold(x)
            return self._head_from_cls(tokens[cu_seqlens[:-1]])
        return self.forward_head(self._features_topk(x))


# ---------------------------------------------------------------------------------------------
# Variants (and timm registration)
# ---------------------------------------------------------------------------------------------


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2106.02034",
        "paper_name": "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
        "origin_url": "https://github.com/raoyongming/DynamicViT",
        **kwargs,
    }


default_cfgs = {
    "dynamicvit_deit_small": _cfg(),
    "dynamicvit_deit_base": _cfg(),
}

_VARIANTS = {
    # timm deit_small_patch16_224 / deit_base_patch16_224 backbones
    "dynamicvit_deit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                  pruning_loc=(3, 6, 9), token_ratio=(0.7, 0.49, 0.343)),
    "dynamicvit_deit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 pruning_loc=(3, 6, 9), token_ratio=(0.7, 0.49, 0.343)),
}


def _create(name: str, pretrained: bool, kwargs: dict) -> DynamicViT:
    pretrained_cfg, overlay = pop_timm_kwargs(name, kwargs)
    if pretrained:
        backbone = name.replace("dynamicvit_", "") + "_patch16_224"
        raise RuntimeError(
            f"{name}: no pretrained DynamicViT weights are available offline in fastvit_kernels. "
            f"Build it with pretrained=False and load a DeiT backbone with "
            f"model.load_backbone(timm.create_model('{backbone}', pretrained=True).state_dict()) "
            "(then train the score predictors), or load a DynamicViT checkpoint with load_state_dict.")
    model = DynamicViT(**{**_VARIANTS[name], **kwargs})
    return attach_cfg(model, name, default_cfgs[name], pretrained_cfg, overlay)


def dynamicvit_deit_small(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT/DeiT-S: prune before blocks 3, 6, 9 to 138 / 97 / 68 tokens (2.9 GFLOPs, 79.3%)."""
    return _create("dynamicvit_deit_small", pretrained, kwargs)


def dynamicvit_deit_base(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT/DeiT-B: prune before blocks 3, 6, 9 to 138 / 97 / 68 tokens."""
    return _create("dynamicvit_deit_base", pretrained, kwargs)


TIMM_REGISTERED = register_with_timm((dynamicvit_deit_small, dynamicvit_deit_base))
