"""MaskedTokenAttention: timm's ViT `Attention` with DynamicViT's two token-dropping paths (docs/policy_attention.md and docs/varlen_attention.md, "Definition").

A drop-in for `timm.models.vision_transformer.Attention`: the same constructor arguments, the same
submodule names and state_dict keys (qkv, q_norm, k_norm, norm, gate, proj), and the same result
when called like timm's. Two keyword-only arguments add DynamicViT's paths:

    attn(x)                                   x [B, N, C]: plain attention, timm's
                                              (F.scaled_dot_product_attention, attn_mask and
                                              is_causal as timm passes them); without grad
                                              on CPU (inference: DynamicViT's pruned tokens)
                                              through fastvit_kernels.ops.bias_attention with
                                              no bias, 1.1-2.4x SDPA's CPU kernel at DeiT-S
                                              sizes (benchmarks/README.md, "DynamicViT")
    attn(x, policy=p)                         x [B, N, C], p [B, N] or [B, N, 1]: DynamicViT's
                                              training attention (`softmax_with_policy`) through
                                              fastvit_kernels.ops.policy_attention
    attn(x, cu_seqlens=cu, max_seqlen=n)      x [T, C] packed tokens of several images (image b in
                                              rows cu[b]:cu[b+1]): attention within each image
                                              through fastvit_kernels.ops.varlen_attention

q, k and v are views of the one qkv projection (no copies; with qk_norm, q and k are the norms'
outputs), and both fused ops return memory laid out so that the reshape to [.., C] is free.

Attention dropout. The fused ops have none. When the module is training with attn_drop > 0:
  * with a policy it falls back to the eager DynamicViT formula (materialised N x N matrix, float32
    statistics, eps 1e-6) with dropout on the normalised attention matrix. (The original DynamicViT
    `Attention.forward` never applies its attn_drop; DeiT's attn_drop is 0, so DynamicViT training
    runs the fused op);
  * packed (cu_seqlens) it falls back to one F.scaled_dot_product_attention per image, with dropout.

`attn.fused = False` takes those plain-PyTorch paths always (the eager DynamicViT formula; SDPA per
image): the benchmarks' "DynamicViT in plain PyTorch" and a switch for debugging.
"""

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvit_kernels import _native
from fastvit_kernels.ops import bias_attention, policy_attention, varlen_attention
from fastvit_kernels.ops.bias_attention import DTYPES as _FUSED_PLAIN_DTYPES
from fastvit_kernels.ops.varlen_attention import check_cu_seqlens
from fastvit_kernels.reference.policy_attention import softmax_with_policy

__all__ = ["MaskedTokenAttention"]

POLICY_EPS = 1e-6  # DynamicViT's softmax_with_policy eps


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"MaskedTokenAttention: {argument} must be {expected}, got {given}")


class MaskedTokenAttention(nn.Module):
    """timm ViT attention plus DynamicViT's keep-policy (training) and packed varlen (inference) paths.

    Args (those of timm.models.vision_transformer.Attention, all supported):
        dim: token width C.
        num_heads: heads H.
        attn_head_dim: head width D (default dim // num_heads).
        dim_out: output width (default dim).
        qkv_bias, proj_bias: biases of the qkv / output projections.
        qk_norm: normalise q and k per head (norm_layer(D)); needs norm_layer.
        scale_norm: normalise the attention output before the projection; needs norm_layer.
        gated: sigmoid gate on the attention output (timm's `gate` Linear).
        attn_drop: attention dropout (see the module docstring for the fused paths).
        proj_drop: dropout after the output projection.
        norm_layer: norm constructor for qk_norm / scale_norm.
        device, dtype: factory arguments.

    Attributes as timm's: num_heads, head_dim, attn_dim, scale, fused_attn (always True: the
    plain path always runs a fused kernel, timm's F.scaled_dot_product_attention or, in CPU
    inference, bias_attention).
    """

    fused_attn: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not isinstance(dim, int) or dim < 1:
            _fail("dim", "an int >= 1", repr(dim))
        if not isinstance(num_heads, int) or num_heads < 1:
            _fail("num_heads", "an int >= 1", repr(num_heads))
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                _fail("dim", f"divisible by num_heads = {num_heads} (or give attn_head_dim)", dim)
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            _fail("norm_layer", "given when qk_norm or scale_norm is True", None)
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= float(p) <= 1.0:
                _fail(name, "in [0, 1]", p)

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # False: the plain-PyTorch policy / packed paths instead of the fused ops (see above).
        self.fused = True

    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "MaskedTokenAttention":
        """A MaskedTokenAttention computing what `attn` (a timm vision_transformer.Attention)
        computes: its submodules are deep-copied (weights, norms, device, dtype, train mode)."""
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(
                    f"MaskedTokenAttention.from_timm: expected a timm vision_transformer.Attention, "
                    f"got {type(attn).__name__} without attribute '{name}'")
        qkv, proj = attn.qkv, attn.proj
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            raise TypeError("MaskedTokenAttention.from_timm: attn.qkv and attn.proj must be nn.Linear")
        H, D = int(attn.num_heads), int(attn.head_dim)
        if qkv.out_features != 3 * H * D:
            raise ValueError(f"MaskedTokenAttention.from_timm: attn.qkv.out_features = "
                             f"{qkv.out_features}, expected 3 * num_heads * head_dim = {3 * H * D}")
        gate = getattr(attn, "gate", None)
        new = cls(
            qkv.in_features, num_heads=H, attn_head_dim=D, dim_out=proj.out_features,
            qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None, gated=gate is not None,
            attn_drop=float(getattr(getattr(attn, "attn_drop", None), "p", 0.0)),
            proj_drop=float(getattr(getattr(attn, "proj_drop", None), "p", 0.0)),
            device="meta",  # every submodule with state is replaced by a copy of attn's below
        )
        new.qkv = copy.deepcopy(qkv)
        new.proj = copy.deepcopy(proj)
        for name in ("q_norm", "k_norm", "norm"):
            module = getattr(attn, name, None)
            setattr(new, name, copy.deepcopy(module) if module is not None else nn.Identity())
        new.gate = copy.deepcopy(gate) if gate is not None else None
        new.scale = float(getattr(attn, "scale", D ** -0.5))
        new.train(attn.training)
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    # -----------------------------------------------------------------------------------------

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
        """
        Args:
            x: [B, N, C] tokens, or [T, C] packed tokens when cu_seqlens is given.
            attn_mask, is_causal: as timm's (plain path only).
            policy: [B, N] or [B, N, 1] float keep decision per token (DynamicViT training;
                differentiable, any real value enters the formula linearly).
            cu_seqlens: [num_images + 1] int32/int64 offsets of the images in packed x.
            max_seqlen: longest image (default: computed from cu_seqlens, one host sync).

        Returns:
            [B, N, dim_out], or [T, dim_out] when packed.
        """
        if policy is not None and cu_seqlens is not None:
            raise ValueError("MaskedTokenAttention: give policy or cu_seqlens, not both")
        if policy is not None or cu_seqlens is not None:
            which = "policy" if policy is not None else "cu_seqlens"
            if attn_mask is not None:
                raise ValueError(f"MaskedTokenAttention: attn_mask cannot be combined with {which}")
            if is_causal:
                raise ValueError(f"MaskedTokenAttention: is_causal cannot be combined with {which}")
        elif max_seqlen is not None:
            raise ValueError("MaskedTokenAttention: max_seqlen is given without cu_seqlens")
        if not isinstance(x, Tensor):
            _fail("x", "a torch.Tensor", type(x).__name__)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            _fail("x.shape[-1]", f"dim = {self.dim}", tuple(x.shape))

        if cu_seqlens is not None:
            return self._forward_packed(x, cu_seqlens, max_seqlen)

        if x.dim() != 3:
            _fail("x", "3-D [B, N, C]" + (" (packed [T, C] needs cu_seqlens)" if x.dim() == 2 else ""),
                  f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if policy is not None:
            self._check_policy(policy, B, N, x)
            if not self.fused or (self.training and self.attn_drop.p > 0):
                attn = softmax_with_policy((q @ k.transpose(-2, -1)) * self.scale, policy, POLICY_EPS)
                out = self.attn_drop(attn) @ v
            else:
                out = policy_attention(q, k, v, policy, scale=self.scale, eps=POLICY_EPS)
        elif self._fused_plain(q, attn_mask, is_causal):
            out = bias_attention(q, k, v, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                scale=None if self.scale == self.head_dim ** -0.5 else self.scale,  # timm passes none
            )
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self._project(out, gate)

    # -----------------------------------------------------------------------------------------

    def _fused_plain(self, q: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> bool:
        """Whether plain attention runs the fused CPU kernel: inference (no grad, so no
        dropout and no backward to match SDPA's) on CPU with the native build, without timm's
        attn_mask / is_causal."""
        return (self.fused and not torch.is_grad_enabled() and attn_mask is None and not is_causal
                and q.device.type == "cpu" and q.dtype in _FUSED_PLAIN_DTYPES and _native.available())

    def _project(self, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    @staticmethod
    def _check_policy(policy, B: int, N: int, x: Tensor) -> None:
        if not isinstance(policy, Tensor):
            _fail("policy", "a torch.Tensor", type(policy).__name__)
        if not (policy.dim() == 2 or (policy.dim() == 3 and policy.shape[2] == 1)) \
                or tuple(policy.shape[:2]) != (B, N):
            _fail("policy.shape", f"[B, N] = [{B}, {N}] or [B, N, 1]", tuple(policy.shape))
        if not policy.dtype.is_floating_point:
            _fail("policy.dtype", "a floating dtype", policy.dtype)
        if policy.device != x.device:
            _fail("policy.device", f"x's device {x.device}", policy.device)

    def _forward_packed(self, x: Tensor, cu_seqlens, max_seqlen: Optional[int]) -> Tensor:
        if x.dim() != 2:
            _fail("x", "2-D packed [T, C] when cu_seqlens is given",
                  f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
        if not isinstance(cu_seqlens, Tensor):
            _fail("cu_seqlens", "a torch.Tensor", type(cu_seqlens).__name__)
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            _fail("cu_seqlens.shape", "[num_images + 1] with at least one image", tuple(cu_seqlens.shape))
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            _fail("cu_seqlens.dtype", "torch.int32 or torch.int64", cu_seqlens.dtype)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        elif isinstance(max_seqlen, Tensor):
            max_seqlen = int(max_seqlen)
        T = x.shape[0]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if not self.fused or (self.training and self.attn_drop.p > 0):
            check_cu_seqlens(cu_seqlens, T, max_seqlen)  # the op's own value checks
            bounds = cu_seqlens.tolist()
            pieces = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                dropout = self.attn_drop.p if self.training else 0.0
                o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=self.scale)
                pieces.append(o[0].transpose(0, 1))
            out = torch.cat(pieces, dim=0)
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=self.scale)
        return self._project(out.reshape(T, self.attn_dim), gate)
