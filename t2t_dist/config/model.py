"""Which model to build and how: a name from the variant table plus per-run overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from t2t_dist.config.base import check_choice, check_positive, check_range

ATTENTIONS = ("sdpa", "eager")
TOKENIZERS = ("performer", "transformer", "convolution", "patch")
BLOCKS = ("standard", "se", "ghost", "dense")
# Fields of the variant a run may change; 0 / "" keep the variant's own value.
ARCHITECTURE_OVERRIDES = ("depth", "embed_dim", "num_heads", "mlp_ratio", "tokens", "block")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "t2t_vit_14"
    img_size: int = 224
    num_classes: int = 1000
    drop_path_rate: float = 0.1
    attention: str = "sdpa"  # "eager" is the reference math, for parity checks
    compile: bool = True  # torch.compile the model in each worker (the fast path)
    pretrained: str | None = None  # path/URL of released weights to start from
    # Architecture overrides of the variant `name` (sweeps over depth and width): 0 or ""
    # keeps the table's value; the model table still validates the result (heads | width).
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    mlp_ratio: float = 0.0
    tokens: str = ""  # one of TOKENIZERS
    block: str = ""  # one of BLOCKS ("dense" needs a dense variant: growth rate, stages)

    def __post_init__(self) -> None:
        check_positive("model.img_size", self.img_size)
        check_positive("model.num_classes", self.num_classes)
        check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        check_choice("model.attention", self.attention, ATTENTIONS)
        for name in ("depth", "embed_dim", "num_heads", "mlp_ratio"):
            check_range(f"model.{name}", getattr(self, name), 0)
        check_choice("model.tokens", self.tokens, ("", *TOKENIZERS))
        check_choice("model.block", self.block, ("", *BLOCKS))

    def architecture(self) -> dict[str, Any]:
        """The overrides this run sets (fields left at 0 / "" are the variant's own)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_OVERRIDES
                if getattr(self, name)}
