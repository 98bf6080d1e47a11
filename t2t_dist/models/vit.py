"""The T2T-ViT model (and the ViT baselines): tokenizer -> class token + position table -> blocks -> head.

    model = create_model("t2t_vit_14", img_size=384, num_classes=10, drop_path_rate=0.1)
    logits = model(images)  # (B, 3, 384, 384) float -> (B, 10)
"""

from __future__ import annotations

import torch
from torch import nn

from t2t_dist.models.blocks import build_blocks
from t2t_dist.models.configs import T2TViTConfig, get_config
from t2t_dist.models.t2t import build_tokenizer, sinusoid_table


class T2TViT(nn.Module):
    """One class for every variant in the table; ``config`` says which."""

    def __init__(self, config: T2TViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.tokenizer_name, tokenizer = build_tokenizer(config)
        self.add_module(self.tokenizer_name, tokenizer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.pos_embed == "sinusoid":  # frozen, yet in the state_dict as upstream has it
            self.pos_embed = nn.Parameter(sinusoid_table(config.num_patches + 1, dim), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.blocks = build_blocks(config)
        self.norm = nn.LayerNorm(config.num_features, eps=config.norm_eps)
        self.head = nn.Linear(config.num_features, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: trunc normal 0.02 on every Linear weight and the class token (and a
        learned position table), zero biases, LayerNorm 1 / 0. Convolutions keep PyTorch's
        default, as upstream; the performer ``w`` and the sinusoid table are left alone."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to train without weight decay (besides 1-D tensors and biases)."""
        return {"cls_token"} | ({"pos_embed"} if self.pos_embed.requires_grad else set())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features), the class token after the final norm."""
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"input images are {tuple(x.shape[-2:])}: expected ({size}, {size}) "
                             f"(build the model with img_size={x.shape[-1]} or resize the input)")
        x = getattr(self, self.tokenizer_name)(x)  # (B, N, dim)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, N + 1, dim)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))


def create_model(name: str, **overrides) -> T2TViT:
    """Build a variant from the table; any T2TViTConfig field can be overridden.

    Raises a one-line ValueError naming an unknown model or override key and what is accepted.
    """
    return T2TViT(get_config(name, **overrides))
