"""Which model to build and how: a name from the variant table plus per-run overrides."""

from __future__ import annotations

from dataclasses import dataclass

from t2t_dist.config.base import check_choice, check_positive, check_range

ATTENTION_PATHS = ("sdpa", "eager")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "t2t_vit_14"
    img_size: int = 224
    num_classes: int = 1000
    drop_path_rate: float = 0.1
    attention: str = "sdpa"  # "eager" is the reference math, for parity checks
    compile: bool = True  # torch.compile the model in each worker (the fast path)
    pretrained: str | None = None  # path/URL of released weights to start from

    def __post_init__(self) -> None:
        check_positive("model.img_size", self.img_size)
        check_positive("model.num_classes", self.num_classes)
        check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        check_choice("model.attention", self.attention, ATTENTION_PATHS)
