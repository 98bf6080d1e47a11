"""The T2T-ViT model family: one variant table, one model class, released-weight loading, counting.

    from t2t_dist.models import create_model, load_pretrained
    model = create_model("t2t_vit_14", img_size=384, num_classes=10, drop_path_rate=0.1)
    model = T2TViT(resolve(config.model))                     # a run's model section
    print(load_pretrained(model, "81.5_T2T_ViT_14.pth.tar"))  # pos_embed resized, head dropped
"""

from t2t_dist.models.configs import VARIANTS, T2TViTConfig, get_config, list_models, resolve
from t2t_dist.models.pretrained import LoadReport, load_pretrained, read_checkpoint, resize_pos_embed
from t2t_dist.models.profile import count_macs, count_params, format_model_table
from t2t_dist.models.vit import T2TViT, create_model

__all__ = [
    "LoadReport", "T2TViT", "T2TViTConfig", "VARIANTS", "count_macs", "count_params",
    "create_model", "format_model_table", "get_config", "list_models", "load_pretrained",
    "read_checkpoint", "resize_pos_embed", "resolve",
]
