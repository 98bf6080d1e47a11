"""The model family: every variant builds, trains and counts as the spec says; the math is the reference's."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.nn.functional as F

from t2t_dist.config.base import from_dict, to_dict
from t2t_dist.models import (VARIANTS, T2TViTConfig, count_macs, count_params, create_model,
                             format_model_table, list_models)
from t2t_dist.models.t2t import (PerformerT2TLayer, TransformerT2TLayer, performer_attention,
                                 performer_attention_reference, sinusoid_table, soft_split_slices)

# Key -> shape of each released checkpoint, read from the authors' files (vendored, 14 JSONs).
SPEC = Path(__file__).parent / "data" / "official_state_dict"
RELEASED = [name for name, config in VARIANTS.items() if config.released]
T2T_VARIANTS = [name for name, config in VARIANTS.items() if config.tokens != "patch"]


def meta_model(name, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def test_table_holds_released_paper_and_tiny_variants():
    names = list_models()
    assert len(RELEASED) == 14 and set(RELEASED) <= set(names)
    for name in ("vit_s_16", "vit_dn", "vit_sw", "vit_se", "vit_resnext", "vit_ghost", "vit_dense",
                 "t2t_vit_14_wo_t2t", "t2t_vitc_14", "t2t_vit_d768_4", "t2t_vit_tiny",
                 "t2t_vit_t_tiny", "t2t_vit_mini"):
        assert name in names
    assert all(isinstance(VARIANTS[n], T2TViTConfig) for n in names)


def test_configs_round_trip_through_plain_dicts():
    for config in VARIANTS.values():
        assert from_dict(T2TViTConfig, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


def test_bad_name_or_override_is_one_line_listing_what_is_accepted():
    with pytest.raises(ValueError) as error:
        create_model("t2t_vit_15")
    message = str(error.value)
    assert "\n" not in message and "'t2t_vit_15'" in message and "t2t_vit_14" in message
    with pytest.raises(ValueError, match=r"unknown model override 'img_sise'.*img_size"):
        create_model("t2t_vit_7", img_sise=64)
    with pytest.raises(ValueError, match=r"model.img_size=100 .*multiple of 16"):
        create_model("t2t_vit_7", img_size=100)
    model = create_model("t2t_vit_tiny", img_size=32)
    with pytest.raises(ValueError, match=r"expected \(32, 32\)"):
        model(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("name", list_models())
def test_variant_trains_at_64px(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64, num_classes=5).train()
    assert model.config.name == name and model.config.img_size == 64
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    starved = [k for k, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not starved, f"parameters without a gradient: {starved}"
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    if model.config.pos_embed == "sinusoid":
        assert "pos_embed" in frozen
    assert all(k == "pos_embed" or k.endswith(".w") for k in frozen)
    assert "cls_token" in model.no_weight_decay()


@pytest.mark.parametrize("name", T2T_VARIANTS)
def test_t2t_variants_run_at_32px(name):
    model = create_model(name, img_size=32, num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    assert model.pos_embed.shape[1] == 2 * 2 + 1


@pytest.mark.parametrize("name", RELEASED)
def test_released_variant_matches_spec(name):
    model = meta_model(name)
    config = model.config
    assert count_params(model)[0] == config.spec_params
    assert count_macs(name) / 1e9 == pytest.approx(config.spec_gmacs, rel=0.01)
    official = json.loads((SPEC / f"{name}.json").read_text())
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert ours == official


def test_t2t_vit_14_at_384():
    model = meta_model("t2t_vit_14", img_size=384)
    assert model.pos_embed.shape == (1, 577, 384)
    assert count_params(model)[0] == 21_691_470
    assert round(count_macs(model, 384) / 1e9, 2) == 16.37


def test_vit_s_16_matches_spec_measurement():
    assert round(count_params(meta_model("vit_s_16"))[0] / 1e6, 2) == 48.75
    assert round(count_macs("vit_s_16") / 1e9, 2) == 9.89


def test_model_table_lists_every_variant():
    table = format_model_table(["t2t_vit_7", "t2t_vit_t_14"])
    assert "4,310,222" in table and "1.147" in table and "21,541,070" in table and "6.089" in table
    assert len(format_model_table().splitlines()) == len(VARIANTS) + 2


def test_init_rules():
    torch.manual_seed(0)
    model = create_model("t2t_vit_7")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    # trunc_normal_(std=0.02) cuts at +-2 (absolute, i.e. 100 std): in effect a plain normal.
    # Its share within one std and its tails tell it from a uniform or a +-2-std-cut init.
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert (weights.abs() <= 0.02).float().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert weights.abs().max().item() > 4 * 0.02
    assert all(m.bias is None or not m.bias.any() for m in linears)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
        assert (norm.weight == 1).all() and not norm.bias.any()
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert not model.pos_embed.requires_grad
    for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2):
        w = layer.w
        assert not w.requires_grad and w.shape == (32, 64)
        torch.testing.assert_close(w @ w.t(), 32 * torch.eye(32), atol=1e-4, rtol=0)


def test_sinusoid_table_is_the_reference_formula():
    positions, dim = 197, 384
    angle = np.array([[p / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)]
                      for p in range(positions)])
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    expected = torch.tensor(angle, dtype=torch.float32).unsqueeze(0)
    torch.testing.assert_close(sinusoid_table(positions, dim), expected, atol=0, rtol=0)
    torch.testing.assert_close(create_model("t2t_vit_14").pos_embed.data, expected, atol=0, rtol=0)


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 3, 64, 64), 7, 4, 2), ((2, 16, 16, 16), 3, 2, 1), ((1, 5, 32, 32), 3, 2, 1)])
def test_compile_soft_split_equals_unfold(shape, kernel, stride, padding):
    image = torch.randn(shape)
    expected = F.unfold(image, kernel, padding=padding, stride=stride).transpose(1, 2)
    assert torch.equal(soft_split_slices(image.permute(0, 2, 3, 1), kernel, stride, padding), expected)


# Straight transcriptions of the reference forward passes (spec: "The Tokens-to-Token module, exactly").
def reference_performer_layer(layer, x):
    emb, m = layer.emb, layer.w.shape[0]
    h = F.layer_norm(x, (x.shape[-1],), layer.norm1.weight, layer.norm1.bias)
    k, q, v = torch.split(F.linear(h, layer.kqv.weight, layer.kqv.bias), emb, dim=-1)

    def prm_exp(z):
        xd = ((z * z).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", z.float(), layer.w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, emb) + 1e-8)
    y = v + F.linear(y, layer.proj.weight, layer.proj.bias)
    mlp = layer.mlp
    z = F.layer_norm(y, (emb,), layer.norm2.weight, layer.norm2.bias)
    return y + F.linear(F.gelu(F.linear(z, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)


def reference_transformer_layer(layer, x):
    B, N, C = x.shape
    attn, emb = layer.attn, layer.attn.emb
    h = F.layer_norm(x, (C,), layer.norm1.weight, layer.norm1.bias)
    qkv = F.linear(h, attn.qkv.weight).reshape(B, N, 3, 1, emb).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q * C ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    y = F.linear((weights @ v).transpose(1, 2).reshape(B, N, emb), attn.proj.weight, attn.proj.bias)
    y = v.squeeze(1) + y
    z = F.layer_norm(y, (emb,), layer.norm2.weight, layer.norm2.bias)
    return y + layer.mlp.fc2(F.gelu(layer.mlp.fc1(z)))


def randomize(module, seed=0):
    """Non-trivial weights (biases and LayerNorm affine too), the same for every attention path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1
                             + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("dim", [147, 576])
def test_t2t_layers_compute_the_reference_math(dim, eager):
    torch.manual_seed(0)
    x = torch.randn(2, 49, dim)
    performer = PerformerT2TLayer(dim, 64, eager=eager).eval()
    randomize(performer)
    performer.w.data = torch.nn.init.orthogonal_(torch.empty(32, 64)) * math.sqrt(32)
    torch.testing.assert_close(performer(x), reference_performer_layer(performer, x), atol=1e-5, rtol=1e-4)
    transformer = TransformerT2TLayer(dim, 64, eager=eager).eval()
    randomize(transformer)
    torch.testing.assert_close(transformer(x), reference_transformer_layer(transformer, x),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["t2t_vit_tiny", "t2t_vit_t_tiny", "t2t_vit_14_se", "t2t_vit_16_ghost",
                                  "t2t_vit_dense", "vit_s_16", "t2t_vitc_14"])
def test_sdpa_and_eager_paths_agree(name):
    torch.manual_seed(0)
    fast = create_model(name, img_size=64, attention="sdpa").eval()
    eager = create_model(name, img_size=64, attention="eager").eval()
    eager.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), eager(x), atol=2e-5, rtol=1e-4)


# Logits of the tiny models on fixed weights and a fixed image: a guard on the forward math.
GOLDEN = {
    "t2t_vit_tiny": [-0.17937, 0.023378, -0.145143, 0.007109],
    "t2t_vit_t_tiny": [-0.143001, 0.093169, -0.159866, -0.024855],
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_logits(name):
    model = create_model(name, img_size=32, num_classes=4).eval()
    randomize(model, seed=1)
    image = torch.linspace(-2, 2, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(image)[0].tolist()
    assert logits == pytest.approx(GOLDEN[name], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_bf16_autocast_training_step(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64, num_classes=10, drop_path_rate=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(4, 3, 64, 64) * 3  # large inputs push the performer's exp() hard
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), torch.arange(4))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()


def test_performer_kernel_stays_finite_on_half_inputs():
    torch.manual_seed(0)
    w = torch.nn.init.orthogonal_(torch.empty(32, 64)) * math.sqrt(32)
    k, q, v = (torch.randn(2, 16, 64) * scale for scale in (40.0, 40.0, 1.0))  # |k|^2/2 > fp16 max
    half = [t.half() for t in (k, q, v)]
    # The reference arithmetic in half precision breaks (the failure upstream users hit) ...
    assert not torch.isfinite(performer_attention_reference(*half, w.half())).all()
    # ... while our layer computes the kernel in float32 under fp16 autocast. Its k, q made
    # large enough (|k|^2 / 2 ~ 40) that exp() underflows in fp16 and the kernel would give 0/0:
    layer = PerformerT2TLayer(64, 64).eval()
    with torch.no_grad():
        layer.kqv.weight.normal_(0, (1.25 / 64) ** 0.5)
        x = torch.randn(2, 16, 64)
        k, q, v = layer.kqv(layer.norm1(x)).split(64, dim=-1)
        in_fp16 = [t.half() for t in (k, q, v, layer.w)]
        assert not torch.isfinite(performer_attention(*in_fp16)).all()
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)
    assert out.dtype == torch.float16  # autocast did run the linear layers in fp16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def performer_attention_float64(k, q, v, w, eps=1e-8):
    """The reference formula written out in float64 with the (T, T) kernel matrix made explicit:
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m); y_t = sum_s K_ts v_s / (sum_s K_ts + eps),
    K_ts = phi(q_t) . phi(k_s). An independent check of the linear-attention factorization."""
    k, q, v, w = (t.double() for t in (k, q, v, w))
    m = w.shape[0]

    def phi(x):  # (B, T, e) -> (B, T, m)
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, T, T)
    return (kernel @ v) / (kernel.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("scale", [0.1, 0.3, 0.5])  # |k|^2 / 2 ~ 0.3 .. 8
@pytest.mark.parametrize("eager", [False, True])
def test_performer_kernel_is_the_reference_formula(scale, eager):
    kernel = performer_attention_reference if eager else performer_attention
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.init.orthogonal_(torch.empty(32, 64), generator=generator) * math.sqrt(32)
    k, q = (torch.randn(2, 16, 64, generator=generator) * scale for _ in range(2))
    v = torch.randn(2, 16, 64, generator=generator)
    expected = performer_attention_float64(k, q, v, w)
    assert expected.std() > 0.05  # a real weighted mix of the values, not all zeros or one row
    torch.testing.assert_close(kernel(k, q, v, w).double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=3, t2t_dropout=0.0)  # train mode
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    F.cross_entropy(model(x), labels).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = torch.compile(model)(x)  # one forward and one backward graph
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-4)
    F.cross_entropy(logits, labels).backward()
    for key, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, atol=1e-5, rtol=1e-3)
