"""t2t-dist: distributed pretraining of T2T-ViT on Ray Train + DeepSpeed + WebDataset + MLflow."""

__version__ = "0.1.0"
