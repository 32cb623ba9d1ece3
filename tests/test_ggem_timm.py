"""patch_timm(model, pool="ggem") / install_ggem_pool on timm VisionTransformers: what gets installed,
that the pooled features equal plain-PyTorch GGeM on the same tokens, that the patched model trains
like one using plain-PyTorch GGeM (same losses and parameters, step by step, from one seed), and
that unpatch_timm restores the model."""

import copy

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import fastvit_kernels  # noqa: E402
from fastvit_kernels import GGeM, patch_timm, unpatch_timm  # noqa: E402
from fastvit_kernels.patch.ggem import install_ggem_pool  # noqa: E402
from fastvit_kernels.reference import ggem_pool as reference  # noqa: E402
from helpers import assert_matches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:fastvit_kernels. the native CPU kernels:RuntimeWarning")


def small_vit(**kwargs) -> VisionTransformer:
    """A 2-block ViT on 32x32 images: 16 patch tokens (+ prefix tokens), 64 channels, 4 heads."""
    torch.manual_seed(kwargs.pop("seed", 0))
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args)


class PlainGGeM(nn.Module):
    """GGeM as the formula, in plain PyTorch (clamp, power, mean, root): the comparison model."""

    def __init__(self, dim, groups, p=3.0, eps=1e-6, num_prefix_tokens=0):
        super().__init__()
        self.groups, self.eps, self.num_prefix_tokens = groups, eps, num_prefix_tokens
        self.p = nn.Parameter(torch.full((groups,), float(p)))

    def forward(self, x):
        return reference.ggem_pool(x, self.p, self.groups, self.eps, "contiguous", self.num_prefix_tokens)


def images(batch=4, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_pool_ggem_installs_ggem_with_one_group_per_head():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    assert model.attn_pool is None
    patch_timm(model, pool="ggem")
    pool = model.attn_pool
    assert type(pool) is GGeM
    assert (pool.dim, pool.groups, pool.layout, pool.num_prefix_tokens) == (192, 3, "contiguous", 0)
    assert pool.p.dtype == torch.float32 and torch.equal(pool.p.detach(), torch.full((3,), 3.0))
    report = model.fastvit_kernels_report
    assert report.replaced == {"vision_transformer.VisionTransformer.attn_pool -> GGeM": 1}
    assert "attn_pool -> GGeM" in str(report)
    assert "attn_pool.p" in model.state_dict()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # Patching again changes nothing.
    patch_timm(model, pool="ggem")
    assert model.attn_pool is pool and model.fastvit_kernels_report.already_patched == 1


@pytest.mark.parametrize("variant", ["cls", "cls+registers", "no-prefix", "include-prefix"])
def test_pooled_features_equal_plain_ggem_on_the_patch_tokens(variant):
    kwargs = {
        "cls": dict(),
        "cls+registers": dict(reg_tokens=4),
        "no-prefix": dict(class_token=False, global_pool="avg"),
        "include-prefix": dict(reg_tokens=2, pool_include_prefix=True),
    }[variant]
    model = small_vit(**kwargs).eval()
    install_ggem_pool(model)
    with torch.no_grad():
        nn.init.uniform_(model.attn_pool.p, 1.0, 8.0)  # a different exponent per group
        tokens = model.forward_features(images())
        got = model.forward_head(tokens, pre_logits=True)
    prefix = model.num_prefix_tokens
    assert model.attn_pool.num_prefix_tokens == (prefix if model.pool_include_prefix else 0)
    want = reference.ggem_pool(tokens[:, prefix:].double(), model.attn_pool.p.detach().double(), 4)
    assert_matches("pooled", got, model.fc_norm(want.float()).double())


def test_patched_model_trains_like_plain_ggem_with_decreasing_loss():
    """Two copies of one model, one with the fused GGeM, one with plain-PyTorch GGeM: every loss
    and every final parameter agree, and the loss goes down."""
    base = small_vit(seed=3)
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    patch_timm(fused, pool="ggem")
    plain.attn_pool = PlainGGeM(64, 4)
    x, labels = images(8, seed=4), torch.arange(8) % 10
    losses = {}
    for name, model in (("fused", fused), ("plain", plain)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(8):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fused"], losses["plain"], rtol=2e-4, atol=1e-5)
    assert losses["fused"][-1] < 0.7 * losses["fused"][0], losses["fused"]
    plain_params = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param, plain_params[name], rtol=1e-3, atol=1e-4, msg=name)
    assert not torch.equal(fused.attn_pool.p.detach(), torch.full((4,), 3.0)), "p did not learn"


def test_unpatch_restores_the_model():
    model = small_vit()
    x = images()
    with torch.no_grad():
        before = model.eval()(x)
    keys = list(model.state_dict())
    patch_timm(model, pool="ggem")
    unpatch_timm(model)
    assert model.attn_pool is None and not hasattr(model, "fastvit_kernels_report")
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_map_pooling_is_replaced_and_restored():
    model = small_vit(global_pool="map")
    latent = model.attn_pool
    patch_timm(model, pool="ggem")
    assert type(model.attn_pool) is GGeM
    assert not any(name.startswith("attn_pool.latent") for name in model.state_dict())
    unpatch_timm(model)
    assert model.attn_pool is latent


def test_install_options_and_training_mode():
    model = small_vit().eval()
    pool = install_ggem_pool(model, groups=8, p=2.0, layout="interleaved", learnable=False)
    assert model.attn_pool is pool and not pool.training
    assert (pool.groups, pool.layout) == (8, "interleaved")
    assert "p" in dict(pool.named_buffers())
    assert model(images()).shape == (4, 10)


def test_bfloat16_model():
    model = small_vit().to(torch.bfloat16)
    patch_timm(model, pool="ggem")
    out = model(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_patched_vit_compiles_fullgraph():
    torch._dynamo.reset()
    model = small_vit()
    patch_timm(model, pool="ggem")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = images()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert model.attn_pool.p.grad is not None


def test_bad_pool_requests_change_nothing():
    model = small_vit()
    with pytest.raises(ValueError, match=r"pool must be None or one of \('ggem',\), got 'gem'"):
        patch_timm(model, pool="gem")
    assert model.attn_pool is None
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no timm VisionTransformer"):
        patch_timm(mlp, pool="ggem")
    # DeiT's distilled model reads its cls and dist tokens in forward_head: attn_pool is unused.
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=10)
    with pytest.raises(ValueError, match="pools through attn_pool"):
        patch_timm(deit, pool="ggem")
    with pytest.raises(TypeError, match="expects a timm VisionTransformer"):
        install_ggem_pool(deit)
    with pytest.raises(ValueError, match="divisible"):
        install_ggem_pool(model, groups=5)
    assert model.attn_pool is None


def test_patch_timm_without_pool_leaves_vits_alone():
    model = small_vit()
    patch_timm(model)
    assert model.attn_pool is None and model.fastvit_kernels_report.num_replaced == 0
    assert isinstance(fastvit_kernels.GGeM(64, 4), nn.Module)
