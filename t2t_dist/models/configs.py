"""The variant table: every model t2t-dist can build, as named configs of names and numbers.

Released variants keep the upstream names so that their checkpoints map key for key
(``tests/data/official_state_dict/<name>.json``, vendored from the released checkpoints). Paper-only variants (Tables 6 and 7)
and tiny configs for tests and the digits demo sit in the same table. Reference figures
(``spec_*`` measured on the reference code, ``paper_*`` as printed) ride along so the model
table can show them beside what we measure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from t2t_dist.config.base import ConfigError, check_choice, check_positive, check_range, fail
from t2t_dist.config.model import ATTENTIONS, BLOCKS, TOKENIZERS, ModelConfig

POS_EMBEDS = ("sinusoid", "learned")


@dataclass(frozen=True, kw_only=True)
class T2TViTConfig:
    """One model variant. ``attention="eager"`` is the reference math, ``"sdpa"`` the fast path."""

    name: str
    # Tokenizer: the T2T module with performer or transformer T2T layers, three convolutions
    # (T2T-ViTc), or a plain ViT patch embedding (ViT-S/16, T2T-ViT without T2T).
    tokens: str = "performer"
    token_dim: int = 64  # width of the T2T layers
    kernel_ratio: float = 0.5  # performer random features m = token_dim * kernel_ratio
    t2t_dropout: float = 0.1  # hard-coded in the reference performer (proj and mlp output)
    patch_size: int = 16  # tokens="patch" only
    # Backbone.
    embed_dim: int = 384
    depth: int = 14
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    qk_scale: float | None = None  # None = head_dim ** -0.5 (some upstream loaders used dim ** -0.5)
    block: str = "standard"
    se_reduction: int = 16  # block="se"
    growth_rate: int = 0  # block="dense": channels each block adds
    dense_stages: tuple[int, ...] = ()  # block="dense": blocks per stage; depth = sum
    pos_embed: str = "sinusoid"  # "sinusoid" is frozen (T2T-ViT); "learned" is ViT's
    norm_eps: float = 1e-5
    # Run-time choices.
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention: str = "sdpa"
    # Reference figures (224 px, 1000 classes); None where there is none.
    released: bool = False
    spec_params: int | None = None  # exact total (frozen pos_embed and w included)
    spec_gmacs: float | None = None
    paper_params_m: float | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None

    def __post_init__(self) -> None:
        check_choice("model.tokens", self.tokens, TOKENIZERS)
        check_choice("model.block", self.block, BLOCKS)
        check_choice("model.attention", self.attention, ATTENTIONS)
        check_choice("model.pos_embed", self.pos_embed, POS_EMBEDS)
        for field in ("token_dim", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size",
                      "in_chans", "num_classes", "patch_size", "norm_eps"):
            check_positive(f"model.{field}", getattr(self, field))
        check_range("model.kernel_ratio", self.kernel_ratio, 0.0, 1.0, low_open=True)
        for field in ("t2t_dropout", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            check_range(f"model.{field}", getattr(self, field), 0.0, 1.0, high_open=True)
        stride = self.patch_size if self.tokens == "patch" else 16
        if self.img_size % stride:
            fail("model.img_size", self.img_size,
                 f"a multiple of {stride} (the {self.tokens} tokenizer's total stride)")
        for dim in self.block_dims():
            if dim % self.num_heads:
                fail("model.num_heads", self.num_heads, f"a divisor of every block width ({dim})")
        if self.block == "dense":
            check_positive("model.growth_rate", self.growth_rate)
            if not self.dense_stages or sum(self.dense_stages) != self.depth:
                fail("model.dense_stages", self.dense_stages,
                     f"blocks per stage summing to depth={self.depth}")
        if self.block == "ghost" and (self.embed_dim % 2 or self.mlp_ratio != int(self.mlp_ratio)):
            fail("model.mlp_ratio", self.mlp_ratio, "an integer with an even embed_dim (ghost)")

    @property
    def num_patches(self) -> int:
        stride = self.patch_size if self.tokens == "patch" else 16
        return (self.img_size // stride) ** 2

    @property
    def num_features(self) -> int:
        """Width after the last block (dense blocks grow it)."""
        return self.block_dims()[-1] + (self.growth_rate if self.block == "dense" else 0)

    def block_dims(self) -> list[int]:
        """Input width of each transformer block, in order (transitions not listed)."""
        if self.block != "dense":
            return [self.embed_dim] * self.depth
        dims, start = [], self.embed_dim
        for blocks in self.dense_stages:
            dims += [start + j * self.growth_rate for j in range(blocks)]
            start = (start + blocks * self.growth_rate) // 2  # the transition halves it
        return dims


def _t2t(name: str, **fields) -> T2TViTConfig:
    return T2TViTConfig(name=name, **fields)


_RELEASED = dict(released=True)
_VIT = dict(tokens="patch", embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0,
            pos_embed="learned", norm_eps=1e-6)  # ViT-S/16 as in the paper's timm baseline
_DENSE = dict(block="dense", embed_dim=128, depth=19, num_heads=8, mlp_ratio=2.0,
              growth_rate=64, dense_stages=(3, 6, 6, 4))

VARIANTS: dict[str, T2TViTConfig] = {c.name: c for c in [
    # Released (yitu-opensource/T2T-ViT), figures from the spec table.
    _t2t("t2t_vit_7", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, **_RELEASED,
         spec_params=4_310_222, spec_gmacs=1.147, paper_params_m=4.3, paper_gmacs=1.1, paper_top1=71.7),
    _t2t("t2t_vit_10", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, **_RELEASED,
         spec_params=5_889_230, spec_gmacs=1.516, paper_params_m=5.9, paper_gmacs=1.5),
    _t2t("t2t_vit_12", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, **_RELEASED,
         spec_params=6_941_902, spec_gmacs=1.763, paper_params_m=6.9, paper_gmacs=1.8, paper_top1=76.5),
    _t2t("t2t_vit_14", **_RELEASED,
         spec_params=21_545_550, spec_gmacs=4.783, paper_params_m=21.5, paper_gmacs=4.8, paper_top1=81.5),
    _t2t("t2t_vit_19", embed_dim=448, depth=19, num_heads=7, **_RELEASED,
         spec_params=39_177_422, spec_gmacs=8.480, paper_params_m=39.2, paper_gmacs=8.5, paper_top1=81.9),
    _t2t("t2t_vit_24", embed_dim=512, depth=24, num_heads=8, **_RELEASED,
         spec_params=64_105_934, spec_gmacs=13.662, paper_params_m=64.1, paper_gmacs=13.8, paper_top1=82.3),
    _t2t("t2t_vit_t_14", tokens="transformer", **_RELEASED,
         spec_params=21_541_070, spec_gmacs=6.089, paper_params_m=21.5, paper_gmacs=6.1, paper_top1=81.7),
    _t2t("t2t_vit_t_19", tokens="transformer", embed_dim=448, depth=19, num_heads=7, **_RELEASED,
         spec_params=39_172_942, spec_gmacs=9.785, paper_params_m=39.2, paper_gmacs=9.8, paper_top1=82.2),
    _t2t("t2t_vit_t_24", tokens="transformer", embed_dim=512, depth=24, num_heads=8, **_RELEASED,
         spec_params=64_101_454, spec_gmacs=14.967, paper_params_m=64.1, paper_gmacs=15.0, paper_top1=82.6),
    _t2t("t2t_vit_14_resnext", num_heads=32, **_RELEASED,
         spec_params=21_545_550, spec_gmacs=4.783, paper_params_m=21.5, paper_gmacs=4.8, paper_top1=81.5),
    _t2t("t2t_vit_14_wide", embed_dim=768, depth=4, num_heads=12, **_RELEASED,
         spec_params=25_156_302, spec_gmacs=5.229, paper_params_m=25.1, paper_gmacs=5.0, paper_top1=77.9),
    _t2t("t2t_vit_14_se", block="se", **_RELEASED,
         spec_params=21_803_598, spec_gmacs=4.784, paper_params_m=21.9, paper_gmacs=4.9, paper_top1=81.6),
    _t2t("t2t_vit_16_ghost", block="ghost", depth=16, **_RELEASED,
         spec_params=16_253_262, spec_gmacs=3.802, paper_params_m=16.3, paper_gmacs=3.7, paper_top1=79.5),
    _t2t("t2t_vit_dense", **_DENSE, **_RELEASED,
         spec_params=23_647_062, spec_gmacs=5.276, paper_params_m=23.7, paper_gmacs=5.5, paper_top1=80.6),
    # Paper only (Tables 6 and 7): the architecture-transfer study.
    _t2t("vit_s_16", **_VIT, spec_gmacs=9.89,  # spec: 48.75M params measured
         paper_params_m=48.6, paper_gmacs=10.1, paper_top1=78.1),
    _t2t("vit_dn", **{**_VIT, "embed_dim": 384, "depth": 16, "num_heads": 6},
         paper_params_m=24.5, paper_gmacs=5.5, paper_top1=79.0),
    _t2t("vit_sw", **{**_VIT, "embed_dim": 1024, "depth": 4, "num_heads": 16},
         paper_params_m=47.9, paper_gmacs=9.9, paper_top1=69.9),
    _t2t("vit_se", **_VIT, block="se", paper_params_m=49.2, paper_gmacs=10.2, paper_top1=78.4),
    _t2t("vit_resnext", **{**_VIT, "num_heads": 32},
         paper_params_m=48.6, paper_gmacs=10.1, paper_top1=78.0),
    _t2t("vit_ghost", **_VIT, block="ghost", paper_params_m=32.1, paper_gmacs=6.9, paper_top1=73.7),
    # The paper's ViT-Dense (128-736 wide) is not specified further; this mirrors T2T-ViT-Dense.
    _t2t("vit_dense", **{**_VIT, **_DENSE}, paper_params_m=46.7, paper_gmacs=9.7, paper_top1=76.8),
    _t2t("t2t_vit_14_wo_t2t", tokens="patch",
         paper_params_m=21.1, paper_gmacs=4.2, paper_top1=79.5),
    _t2t("t2t_vitc_14", tokens="convolution",
         paper_params_m=21.3, paper_gmacs=4.6, paper_top1=80.8),
    _t2t("t2t_vit_d768_4", embed_dim=768, depth=4, num_heads=12,
         paper_params_m=25.0, paper_gmacs=5.4, paper_top1=78.8),
    # Tiny configs: tests (both T2T layer flavours) and the digits demo (CPU, 32-64 px).
    _t2t("t2t_vit_tiny", token_dim=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    _t2t("t2t_vit_t_tiny", tokens="transformer", token_dim=16, embed_dim=32, depth=2,
         num_heads=2, mlp_ratio=2.0),
    _t2t("t2t_vit_mini", token_dim=32, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0),
]}


def list_models() -> list[str]:
    """Every name in the variant table, in table order."""
    return list(VARIANTS)


def get_config(name: str, **overrides) -> T2TViTConfig:
    """The named config with field overrides applied; one-line ValueError on a bad name or key."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(VARIANTS)}")
    known = [f.name for f in dataclasses.fields(T2TViTConfig) if f.name != "name"]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"unknown model override {key!r}: expected one of {', '.join(known)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def resolve(model: ModelConfig) -> T2TViTConfig:
    """The variant table's config for a run's ``model`` section: the variant ``model.name``
    with the run's image size, classes, drop path, attention and architecture overrides.
    Raises a one-line ConfigError when the result is not buildable (heads must divide widths,
    the image size must fit the tokenizer's stride)."""
    return get_config(model.name, **model.architecture(), img_size=model.img_size,
                      num_classes=model.num_classes, drop_path_rate=model.drop_path_rate,
                      attention=model.attention)
