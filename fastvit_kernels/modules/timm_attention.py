"""Fused replacements for the attention of timm's Swin, TinyViT, EfficientFormer and
EfficientViT-MSRA (docs/patching.md, "Families").

Each of these computes softmax(q kᵀ·scale + table[:, index] (+ Swin's shifted-window mask)) v in
plain PyTorch; the replacements run that core as one `bias_attention` call that reads q, k and v
in place from the model's own projection (docs/bias_attention.md). Every class here subclasses the
timm class it replaces, so constructor arguments, parameters, buffers, state_dict keys and every
other method are timm's; only `forward` differs, and it computes the same function.

    SwinWindowAttention.from_timm(m)   # shares m's parameters, buffers and submodules (no copies)
    module.to_timm()                   # the reverse, for unpatching

Importing this file imports timm (the patch registry imports it only when it is used).

Attention dropout in training (`attn_drop.p > 0`, Swin only; timm's models use 0 by default) has
no fused form: such a module computes timm's unfused formula while training.
"""

from typing import Optional

import torch
from torch import Tensor
from timm.models import efficientformer, efficientformer_v2, efficientvit_msra, swin_transformer, tiny_vit

from fastvit_kernels import _native
from fastvit_kernels.modules.bias_attention import adopt
from fastvit_kernels.ops import bias_attention

__all__ = [
    "SwinWindowAttention", "TinyVitAttention", "EfficientFormerAttention", "EfficientVitCascadedAttention",
    "EfficientFormerV2Downsample",
]


def attend(q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor, mask: Optional[Tensor],
           scale: float) -> Tensor:
    """bias_attention without an activation; under TorchScript, the native dispatcher op (whose
    autograd is C++), which only runs CPU tensors."""
    if torch.jit.is_scripting():
        if q.device.type != "cpu":
            raise RuntimeError(
                "fastvit_kernels attention under TorchScript runs the native CPU kernels only; on CUDA "
                "use the module itself (eager or torch.compile)"
            )
        return torch.ops.fastvit_kernels.bias_attention_forward(q, k, v, table, index, mask, scale, "none", False)[0]
    return bias_attention(q, k, v, table, index, mask=mask, scale=scale)


# FX records the call (evaluated when the traced module runs) instead of tracing into it.
torch.fx.wrap("attend")


class _TimmSubclass:
    """from_timm / to_timm for a replacement that subclasses its timm class."""

    @classmethod
    def timm_class(cls) -> type:
        return cls.__mro__[2]  # (cls, _TimmSubclass, the timm class, ...)

    @classmethod
    def from_timm(cls, module: torch.nn.Module):
        """The replacement for a timm module, sharing its parameters, buffers and submodules."""
        if type(module) is not cls.timm_class():
            timm_cls = cls.timm_class()
            raise TypeError(
                f"{cls.__name__}.from_timm expects a {timm_cls.__module__}.{timm_cls.__qualname__}, "
                f"got {type(module).__module__}.{type(module).__qualname__}"
            )
        return adopt(module, cls)

    def to_timm(self) -> torch.nn.Module:
        """The timm module this replaces, sharing this module's parameters, buffers and submodules."""
        return adopt(self, self.timm_class())

    def __prepare_scriptable__(self):
        _native.require_for_script(type(self).__name__, "bias_attention_forward")
        return self


class SwinWindowAttention(_TimmSubclass, swin_transformer.WindowAttention):
    """timm `swin_transformer.WindowAttention` (Swin v1): windows of N tokens, the table stored
    [T, H] (passed to the op as a transposed view), the shifted-window mask [nW, N, N] added to
    window b of the batch as mask[b % nW]."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.training and self.attn_drop.p > 0:
            x = self._with_attention_dropout(q, k, v, mask)
        else:
            x = attend(q, k, v, self.relative_position_bias_table.t(), self.relative_position_index, mask,
                       self.scale)
        x = self.proj(x.transpose(1, 2).reshape(B_, N, -1))
        return self.proj_drop(x)

    def _with_attention_dropout(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """timm's unfused formula, dropout on the attention weights included."""
        B_, H, N, _ = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = (attn.view(-1, num_win, H, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, H, N, N)
        return self.attn_drop(attn.softmax(dim=-1)) @ v


class TinyVitAttention(_TimmSubclass, tiny_vit.Attention):
    """timm `tiny_vit.Attention`: LayerNorm, then per-head [q | k | v] channels of one Linear."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attention_biases,
                   self.attention_bias_idxs, None, self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.out_dim))


class EfficientFormerAttention(_TimmSubclass, efficientformer.Attention):
    """timm `efficientformer.Attention` (the last stage's 7×7 tokens, Dv = 4·Dk)."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attention_biases,
                   self.attention_bias_idxs, None, self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.val_attn_dim))


class EfficientVitCascadedAttention(_TimmSubclass, efficientvit_msra.CascadedGroupAttention):
    """timm `efficientvit_msra.CascadedGroupAttention`: one head at a time, each head's input the
    previous head's output plus its own channel group; q, k, v are channel-major [B, D, N] views,
    passed to the op as [B, 1, N, D] (token stride 1), and head h uses table row h."""

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        for head, (qkv, dws) in enumerate(zip(self.qkvs, self.dws)):
            if head > 0:
                feat = feat + feats_in[head]
            q, k, v = qkv(feat).view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dws(q)
            q, k, v = (t.flatten(2).unsqueeze(1).transpose(2, 3) for t in (q, k, v))
            out = attend(q, k, v, self.attention_biases[head:head + 1], self.attention_bias_idxs, None, self.scale)
            # [B, 1, N, Dv] over [B, N, 1, Dv] memory -> [B, Dv, H, W] as an NCHW copy: the next
            # head's 1x1 convolutions ran ~25% slower on the channels-last view (batch 1, compiled)
            feat = out.squeeze(1).transpose(1, 2).contiguous().view(B, self.val_dim, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class EfficientFormerV2Downsample(_TimmSubclass, efficientformer_v2.Attention2dDownsample):
    """timm `efficientformer_v2.Attention2dDownsample`: shrink attention (queries on the stride-2
    grid from LocalGlobalQuery, keys and values on the full grid, LeViT's strided index), all
    channel-major [B, H·D, R0, R1], read as [B, H, N, D] views. (Its sibling Attention2d mixes
    heads around the softmax and is left alone.)"""

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        q = self.q(x).reshape(B, self.num_heads, -1, self.N2).transpose(2, 3)
        k = self.k(x).reshape(B, self.num_heads, -1, self.N).transpose(2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, self.N).transpose(2, 3)
        out = attend(q, k, v, self.attention_biases, self.attention_bias_idxs, None, self.scale)
        x = out.transpose(2, 3).reshape(B, self.dh, self.resolution2[0], self.resolution2[1]) + v_local
        return self.proj(self.act(x))
