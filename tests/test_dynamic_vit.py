"""DynamicViT (fastvit_kernels.models.dynamic_vit) against a plain-PyTorch DynamicViT written here
after raoyongming/DynamicViT `VisionTransformerDiffPruning` (same weights, same Gumbel noise).

Numerical checks run a small config (32 x 32 images, 8 x 8 patches: 16 patch tokens, C 64,
depth 6, 2 heads, pruning before blocks 1, 3, 5); the DeiT-S checks are structural plus one
batch-1 forward at 224.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit_kernels  # noqa: F401  (registers the models with timm)
from fastvit_kernels.models import DynamicViT
from fastvit_kernels.models.dynamic_vit import PredictorLG, sample_gumbel_noise

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10)
PRUNE = dict(pruning_loc=(1, 3, 5), token_ratio=(0.75, 0.5, 0.25))  # 16 -> 12 -> 8 -> 4 patches
TOL = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=1e-3, atol=1e-4)}
DEIT_S_PARAMS = 22_050_664
PREDICTOR_PARAMS_384 = 241_250  # LN 768 + 384*384+384 + 384*192+192 + 192*96+96 + 96*2+2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster (and far faster on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The oracle: DynamicViT's code, plain PyTorch
# ---------------------------------------------------------------------------------------------

def ref_batch_index_select(x, idx):
    B, N = x.shape[:2]
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = (idx + offset).reshape(-1)
    if x.dim() == 3:
        return x.reshape(B * N, -1)[idx].reshape(B, -1, x.shape[2])
    return x.reshape(B * N)[idx].reshape(B, -1)


def ref_gumbel_hard(logits, noise):
    if noise is None:
        return F.gumbel_softmax(logits, hard=True)
    y_soft = (logits + noise).softmax(-1)
    index = y_soft.max(-1, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(-1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def softmax_with_policy(self, attn, policy, eps=1e-6):
        B, N, _ = policy.size()
        attn_policy = policy.reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
        attn_policy = attn_policy + (1.0 - attn_policy) * eye
        max_att = torch.max(attn, dim=-1, keepdim=True)[0]
        attn = attn - max_att
        stat = torch.float64 if attn.dtype == torch.float64 else torch.float32
        attn = attn.to(stat).exp_() * attn_policy.to(stat)
        attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
        return attn.type_as(max_att)

    def forward(self, x, policy=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1) if policy is None else self.softmax_with_policy(attn, policy)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x, policy=None):
        x = x + self.attn(self.norm1(x), policy=policy)
        return x + self.mlp(self.norm2(x))


class RefPredictorLG(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(), nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(), nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x, policy):
        x = self.in_conv(x)
        B, N, C = x.size()
        local_x = x[:, :, :C // 2]
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
        return self.out_conv(x)


class RefDynamicViT(nn.Module):
    """VisionTransformerDiffPruning.forward, with the Gumbel noise as an argument."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes,
                 pruning_loc, token_ratio, distill=False):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.init_n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.init_n + 1, embed_dim))
        self.blocks = nn.ModuleList(RefBlock(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.score_predictor = nn.ModuleList(RefPredictorLG(embed_dim) for _ in pruning_loc)
        self.pruning_loc, self.token_ratio, self.distill = pruning_loc, token_ratio, distill

    def forward(self, x, noise=None):
        B = x.shape[0]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed
        p_count, out_pred_prob, init_n = 0, [], self.init_n
        prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
        policy = torch.ones(B, init_n + 1, 1, dtype=x.dtype, device=x.device)
        for i, blk in enumerate(self.blocks):
            if i in self.pruning_loc:
                pred_score = self.score_predictor[p_count](x[:, 1:], prev_decision).reshape(B, -1, 2)
                if self.training:
                    stage_noise = None if noise is None else noise[p_count]
                    hard_keep_decision = ref_gumbel_hard(pred_score, stage_noise)[:, :, 0:1] * prev_decision
                    out_pred_prob.append(hard_keep_decision.reshape(B, init_n))
                    cls_policy = torch.ones(B, 1, 1, dtype=x.dtype, device=x.device)
                    policy = torch.cat([cls_policy, hard_keep_decision], dim=1)
                    x = blk(x, policy=policy)
                    prev_decision = hard_keep_decision
                else:
                    score = pred_score[:, :, 0]
                    num_keep_node = int(init_n * self.token_ratio[p_count])
                    keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                    cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=keep_policy.device)
                    now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
                    x = ref_batch_index_select(x, now_policy)
                    prev_decision = ref_batch_index_select(prev_decision, keep_policy)
                    x = blk(x)
                p_count += 1
            else:
                x = blk(x, policy) if self.training else blk(x)
        x = self.norm(x)
        features, logits = x[:, 1:], self.head(x[:, 0])
        if self.training:
            if self.distill:
                return logits, features, prev_decision.detach(), out_pred_prob
            return logits, out_pred_prob
        return logits

    def forward_single_threshold(self, img, threshold):
        """One image, dropping patch tokens whose keep probability < threshold (eval)."""
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token, x), dim=1) + self.pos_embed
        p_count = 0
        for i, blk in enumerate(self.blocks):
            if i in self.pruning_loc:
                n = x.shape[1] - 1
                if n > 0:
                    ones = torch.ones(1, n, 1, dtype=x.dtype)
                    pred = self.score_predictor[p_count](x[:, 1:], ones)
                    keep = pred[0, :, 0].exp() >= threshold
                    idx = torch.cat([torch.zeros(1, dtype=torch.long), keep.nonzero()[:, 0] + 1])
                    x = x[:, idx]
                p_count += 1
            x = blk(x)
        return self.head(self.norm(x)[:, 0]), x.shape[1]


def _randomize(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            shift = 1.0 if ("norm" in name or "in_conv.0" in name) and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + shift)


def _pair(dtype, seed=0, distill=False, keep_bias=1.0):
    model = DynamicViT(**SMALL, **PRUNE, distill=distill).to(dtype)
    _randomize(model, seed)
    with torch.no_grad():  # lean towards keeping, so no image loses every token (0/0 in the original)
        for pred in model.score_predictor:
            pred.out_conv[4].bias.copy_(torch.tensor([keep_bias, -keep_bias]))
    ref = RefDynamicViT(**SMALL, **PRUNE, distill=distill).to(dtype)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def _images(B, dtype, seed=1):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loss(outputs, labels, ratios):
    logits, decisions = outputs[0], outputs[-1]
    loss = F.cross_entropy(logits, labels)
    for d, r in zip(decisions, ratios):
        loss = loss + ((d.mean(dim=1) - r) ** 2).mean()
    if len(outputs) == 4:  # distill: features and the last decision
        loss = loss + (outputs[1] * outputs[2]).pow(2).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,distill", [(torch.float64, False), (torch.float64, True), (torch.float32, False)])
def test_training_step_matches_dynamicvit(dtype, distill):
    model, ref = _pair(dtype, seed=2, distill=distill)
    model.train(), ref.train()
    B, n = 4, 16
    x = _images(B, dtype)
    labels = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    noise = [sample_gumbel_noise((B, n, 2), generator=g, dtype=dtype) for _ in range(3)]
    out = model(x, gumbel_noise=noise)
    out_ref = ref(x, noise=noise)
    assert len(out) == (4 if distill else 2) and len(out[-1]) == 3
    torch.testing.assert_close(out[0], out_ref[0], **TOL[dtype])
    for d, d_ref in zip(out[-1], out_ref[-1]):
        assert d.shape == (B, n)
        torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    kept = [int(d.sum()) for d in out[-1]]
    assert kept[0] < B * n and kept[-1] > 0  # the noise really prunes, and not everything
    if distill:
        torch.testing.assert_close(out[1], out_ref[1], **TOL[dtype])
        assert out[2].shape == (B, n, 1) and not out[2].requires_grad
    _loss(out, labels, PRUNE["token_ratio"]).backward()
    _loss(out_ref, labels, PRUNE["token_ratio"]).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert model.score_predictor[2].out_conv[4].weight.grad.abs().sum() > 0  # predictors learn


def test_training_all_tokens_dropped_stays_finite():
    # The original divides 0 / 0 in the next predictor when an image has dropped every token.
    model, ref = _pair(torch.float64, seed=2, keep_bias=-30.0)
    model.train(), ref.train()
    x = _images(2, torch.float64)
    noise = [torch.zeros(2, 16, 2, dtype=torch.float64)] * 3
    logits, decisions = model(x, gumbel_noise=noise)
    assert all(d.sum() == 0 for d in decisions) and torch.isfinite(logits).all()
    assert torch.isnan(ref(x, noise=noise)[0]).all()


def test_training_default_noise_is_f_gumbel_softmax_and_generator_reproducible():
    model, ref = _pair(torch.float64, seed=5)
    model.train(), ref.train()
    x = _images(3, torch.float64, seed=6)
    torch.manual_seed(11)
    a = model(x)
    torch.manual_seed(11)
    b = ref(x)  # F.gumbel_softmax, same RNG stream
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float64])
    for d, e in zip(a[1], b[1]):
        assert torch.equal(d, e)
    c = model(x, gumbel_noise=torch.Generator().manual_seed(3))
    d = model(x, gumbel_noise=torch.Generator().manual_seed(3))
    assert torch.equal(c[0], d[0])
    with pytest.raises(ValueError, match="gumbel_noise"):
        model(x, gumbel_noise=[torch.zeros(3, 16, 2, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------

def _record_block_inputs(model):
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0].shape, kwargs.get("cu_seqlens")))

    handles = [blk.register_forward_pre_hook(hook, with_kwargs=True) for blk in model.blocks]
    return seen, handles


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_inference_matches_reference_gather(dtype):
    model, ref = _pair(dtype, seed=7)
    model.eval(), ref.eval()
    x = _images(5, dtype, seed=8)
    seen, handles = _record_block_inputs(model)
    with torch.no_grad():
        out, out_ref = model(x), ref(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    assert [s[0][1] for s in seen] == [17, 13, 13, 9, 9, 5]
    assert model.token_counts() == [17, 13, 9, 5]
    assert model.forward_features(x).shape == (5, 5, 64)


def test_topk_inference_compiles_and_exports_with_the_fused_attention():
    """Top-k inference on CPU runs its plain attention through bias_attention (no bias): one
    graph under torch.compile(fullgraph=True), the op kept by torch.export, both matching eager."""
    if not fastvit_kernels._native.available():
        pytest.skip("the fused plain attention needs the native CPU kernels")
    model, _ = _pair(torch.float32, seed=7)
    model.eval()
    x = _images(3, torch.float32, seed=8)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, **TOL[torch.float32])
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), want, **TOL[torch.float32])
    calls = [n for n in program.graph.nodes if "bias_attention" in str(n.target)]
    assert len(calls) == SMALL["depth"], [str(n.target) for n in calls]


@pytest.mark.parametrize("threshold", [0.45, 0.5, 0.6])
def test_threshold_inference_equals_each_image_alone(threshold):
    dtype = torch.float64
    model, ref = _pair(dtype, seed=9, keep_bias=0.0)  # keep probabilities spread around 0.5
    model.eval(), ref.eval()
    model.set_keep_mode("threshold", threshold)
    x = _images(4, dtype, seed=10)
    seen, handles = _record_block_inputs(model)
    with torch.no_grad():
        out = model(x)
        singles = [ref.forward_single_threshold(x[b:b + 1], threshold) for b in range(4)]
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, torch.cat([s[0] for s in singles]), **TOL[dtype])
    final_cu = seen[-1][1]
    lengths = (final_cu[1:] - final_cu[:-1]).tolist()
    assert lengths == [s[1] for s in singles]
    assert all(len(s[0]) == 2 and s[1] is not None for s in seen)  # every block ran packed
    per_stage = [tuple((s[1][1:] - s[1][:-1]).tolist()) for s in seen]
    assert len(set(per_stage[-1])) > 1, per_stage  # images kept different counts
    tokens, cu = model.forward_features(x)
    assert tokens.shape == (int(cu[-1]), 64)


def test_threshold_keeping_everything_is_plain_vit():
    model = DynamicViT(**SMALL, **PRUNE).eval()
    vit = VisionTransformer(**SMALL).eval()
    _randomize(vit, seed=12)
    missing = model.load_backbone(vit.state_dict())
    assert missing and all(k.startswith("score_predictor.") for k in missing)
    model.set_keep_mode("threshold", 0.0)
    x = _images(3, torch.float32, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), **TOL[torch.float32])
        model.set_keep_mode("threshold", 1.0)  # (nearly) everything dropped: cls only, still runs
        assert model(x).shape == (3, 10)


def test_train_eval_modes_and_keep_mode_validation():
    model = DynamicViT(**SMALL, **PRUNE)
    with pytest.raises(ValueError, match="keep_mode"):
        model.set_keep_mode("median")
    with pytest.raises(ValueError, match="keep_threshold"):
        model.set_keep_mode("threshold", 1.5)
    with pytest.raises(ValueError, match="token_ratio"):
        DynamicViT(**SMALL, pruning_loc=(1, 3), token_ratio=(0.5, 0.75))
    with pytest.raises(ValueError, match="pruning_loc"):
        DynamicViT(**SMALL, pruning_loc=(3, 1), token_ratio=(0.75, 0.5))
    with pytest.raises(ValueError, match="global_pool"):
        DynamicViT(**SMALL, **PRUNE, global_pool="avg")
    m = DynamicViT(**SMALL, **PRUNE, keep_mode="threshold", keep_threshold=0.3)
    assert (m.keep_mode, m.keep_threshold) == ("threshold", 0.3)


def test_predictor_packed_equals_batched():
    pred = PredictorLG(64).double()
    _randomize(pred, seed=14)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    dense = pred(x, torch.ones(3, 7, 1, dtype=torch.float64))
    packed = pred.forward_packed(x.reshape(21, 64), torch.arange(3).repeat_interleave(7), 3)
    torch.testing.assert_close(packed, dense.reshape(21, 2), **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# DeiT-S
# ---------------------------------------------------------------------------------------------

def test_deit_small_from_timm():
    model = timm.create_model("dynamicvit_deit_small")
    assert isinstance(model, DynamicViT)
    deit = timm.create_model("deit_small_patch16_224")
    deit_params = sum(p.numel() for p in deit.parameters())
    assert deit_params == DEIT_S_PARAMS
    assert sum(p.numel() for p in model.parameters()) == DEIT_S_PARAMS + 3 * PREDICTOR_PARAMS_384
    assert set(model.state_dict()) - set(deit.state_dict()) == {
        k for k in model.state_dict() if k.startswith("score_predictor.")}
    missing = model.load_backbone(deit.state_dict())
    assert sorted(missing) == sorted(k for k in model.state_dict() if k.startswith("score_predictor."))
    assert torch.equal(model.blocks[7].attn.qkv.weight, deit.blocks[7].attn.qkv.weight)
    assert model.pruning_loc == [3, 6, 9] and model.token_counts() == [197, 138, 97, 68]
    bad = dict(deit.state_dict(), extra=torch.zeros(1))
    with pytest.raises(RuntimeError, match="unexpected"):
        model.load_backbone(bad)
    del bad["extra"], bad["norm.weight"]
    with pytest.raises(RuntimeError, match="norm.weight"):
        model.load_backbone(bad)

    model.eval()
    seen, handles = _record_block_inputs(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    for h in handles:
        h.remove()
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert [s[0][1] for s in seen] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3


def test_registered_variants_and_pretrained_error():
    assert "dynamicvit_deit_small" in timm.list_models("dynamicvit_*")
    assert "dynamicvit_deit_base" in timm.list_models("dynamicvit_*")
    with pytest.raises(RuntimeError, match="load_backbone"):
        timm.create_model("dynamicvit_deit_small", pretrained=True)
    base = timm.create_model("dynamicvit_deit_base", device="meta")
    n_base = sum(p.numel() for p in base.parameters())
    c = 768
    predictor = 2 * c + c * c + c + c * (c // 2) + c // 2 + (c // 2) * (c // 4) + c // 4 + (c // 4) * 2 + 2
    assert n_base == 86_567_656 + 3 * predictor  # deit_base_patch16_224 + predictors
    assert timm.create_model("dynamicvit_deit_small", num_classes=7, device="meta").head.out_features == 7
