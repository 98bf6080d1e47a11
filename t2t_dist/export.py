"""Weights out of a run: any source -> one plain fp32 state_dict; write it; register it in MLflow.

Sources ``resolve_weights`` accepts (evaluation, fine-tuning and ``t2t-dist export`` share it):

    81.5_T2T_ViT_14.pth.tar, x.pt, x.safetensors   a released checkpoint file or our export
    runs/demo/checkpoint_step_00000230             one of our Ray checkpoints (ZeRO shards)
    runs/demo, or demo (under run.storage_path)    a run: its latest checkpoint
    models:/name@alias, runs:/<run id>/model       an MLflow model

    weights = resolve_weights("runs/demo", storage_path="./runs")
    state = released_state_dict(weights)           # fp32, the released key layout
    save_weights(state, "t2t_vit_mini.safetensors")
    register_model(state, model=weights.model_config, name="digits", alias="candidate", ...)

ZeRO shards are consolidated offline with DeepSpeed's ``zero_to_fp32`` (the fp32 master
weights, any stage, any number of ranks); no process group and no Ray are needed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import load_file, save_file

from t2t_dist.checkpoint import DEEPSPEED_TAG
from t2t_dist.config import SAVED_CONFIG, ModelConfig, from_dict
from t2t_dist.models import T2TViT, load_pretrained, resolve
from t2t_dist.models.pretrained import PREFIXES, SUB_DICTS
from t2t_dist.tracking import RUN_NAME_TAG, experiment_id, find_run, mlflow_client

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
FORMATS = ("pt", "safetensors")


@dataclass
class Weights:
    """Resolved weights: ``checkpoint`` is what ``load_pretrained`` takes (a state dict, or a
    released file's dict with ``state_dict``/``state_dict_ema``), plus where they came from."""

    checkpoint: Mapping[str, Any]
    source: str
    kind: str  # "file", "checkpoint" (ours, ZeRO shards) or "mlflow"
    run_config: dict[str, Any] | None = None  # the run's saved config, for our checkpoints
    step: int | None = None

    @property
    def model_config(self) -> ModelConfig | None:
        """The model section of the run that wrote these weights, when known."""
        if not self.run_config or "model" not in self.run_config:
            return None
        return from_dict(ModelConfig, self.run_config["model"], prefix="model")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def is_checkpoint_dir(path: Path) -> bool:
    return (path / DEEPSPEED_TAG).is_dir() or (path / "ema.pt").is_file()


def find_checkpoint(source: str, storage_path: str = "") -> Path | None:
    """Our checkpoint folder for ``source`` (a checkpoint, a run folder or a run name under
    ``storage_path``: its latest checkpoint); None when ``source`` is none of these."""
    candidates = [Path(source).expanduser()]
    if storage_path and "://" not in storage_path and "/" not in source:
        candidates.append(Path(storage_path) / source)  # a run name
    for path in candidates:
        if not path.is_dir():
            continue
        if is_checkpoint_dir(path):
            return path
        steps = sorted(p for p in path.glob("checkpoint_step_*") if is_checkpoint_dir(p))
        if steps:
            return steps[-1]
        raise FileNotFoundError(f"checkpoint {source!r} is invalid: folder {str(path)!r} holds no "
                                f"checkpoint (expected {DEEPSPEED_TAG}/ or checkpoint_step_*/ "
                                f"written by a training run)")
    return None


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """A released ``.pth.tar``/``.pt`` file (any of its layouts) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: expected a weights "
                                f"file, a run's checkpoint folder, a run name or an MLflow "
                                f"model URI (models:/NAME@ALIAS, runs:/ID/model)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # timm-style training checkpoints also pickle their argparse.Namespace of arguments.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def consolidate_checkpoint(directory: str | Path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one of our checkpoints: the EMA weights (``ema.pt``) or the fp32
    master weights gathered from every rank's ZeRO shards (frozen tensors and buffers included)."""
    directory = Path(directory)
    if ema:
        if not (directory / "ema.pt").is_file():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} holds no EMA weights (ema.pt): "
                                    f"the run had optim.ema_decay=0; leave out --ema")
        return dict(torch.load(directory / "ema.pt", map_location="cpu",
                               weights_only=False)["shadow"])
    if not (directory / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} holds no DeepSpeed state "
                                f"'{DEEPSPEED_TAG}/'")
    if not any((directory / DEEPSPEED_TAG).glob("*optim_states.pt")):
        # ZeRO-0: no shards; the module rank 0 saved is the whole model (fp32 weights in fp32
        # and bf16-autocast runs, the fp16 copy in fp16 runs).
        state = torch.load(directory / DEEPSPEED_TAG / "mp_rank_00_model_states.pt",
                           map_location="cpu", weights_only=False)["module"]
    else:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        # deepspeed: ~1.2 s to import, and it must see DS_ACCELERATOR first (above).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    return {name: tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
            for name, tensor in state.items()}


def load_mlflow_state_dict(uri: str, tracking_uri: str = "") -> dict[str, torch.Tensor]:
    """The state dict of an MLflow PyTorch model (``models:/name@alias``, ``runs:/id/model``)."""
    import mlflow  # ~1 s: only for MLflow sources

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:  # MlflowException (unknown name/alias/run), OSError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {uri!r} cannot be loaded from MLflow "
                         f"({tracking_uri or 'default store'}): {reason}") from None
    return dict(model.state_dict())


def resolve_weights(source: str, *, storage_path: str = "", tracking_uri: str = "",
                    ema: bool = False) -> Weights:
    """Whatever ``source`` names, as weights ``load_pretrained`` takes (see the module doc).

    ``ema`` picks the EMA weights: ``ema.pt`` of our checkpoints, ``state_dict_ema`` of a
    released file. A missing source raises FileNotFoundError naming what was looked for.
    """
    if not source:
        raise FileNotFoundError("checkpoint is empty: expected a weights file, a run's checkpoint "
                                "folder, a run name or an MLflow model URI")
    if is_mlflow_uri(source):
        if ema:
            raise ValueError(f"--ema does not apply to an MLflow model ({source!r}): pass the EMA "
                             f"model's URI instead (runs:/RUN_ID/model_ema)")
        return Weights(load_mlflow_state_dict(source, tracking_uri), source=source, kind="mlflow")
    directory = find_checkpoint(source, storage_path)
    if directory is not None:
        config_path = directory.parent / SAVED_CONFIG
        run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        client = directory / "client" / "rank_00000.pt"
        step = torch.load(client, weights_only=False)["step"] if client.is_file() else None
        return Weights(consolidate_checkpoint(directory, ema=ema), source=str(directory),
                       kind="checkpoint", run_config=run_config, step=step)
    checkpoint = read_weights_file(source)
    if ema:
        if not isinstance(checkpoint.get("state_dict_ema"), Mapping):
            raise ValueError(f"checkpoint {source!r} holds no 'state_dict_ema': leave out --ema")
        checkpoint = {"state_dict_ema": checkpoint["state_dict_ema"]}
    return Weights(checkpoint, source=source, kind="file")


def source_model_id(weights: Weights, tracking_uri: str, *, ema: bool = False) -> str:
    """The MLflow model ``weights`` came from, for lineage ("" when none is known): an MLflow
    model URI's own model, or the final model (``model_ema`` with ``ema``) the run that wrote
    one of our checkpoints logged in ``tracking_uri``."""
    try:
        if weights.kind == "mlflow":
            import mlflow  # ~1 s: imported already to load the weights

            mlflow.set_tracking_uri(tracking_uri)
            return mlflow.models.get_model_info(weights.source).model_id or ""
        if weights.kind != "checkpoint":
            return ""
        client = mlflow_client(tracking_uri)
        run_name = Path(weights.source).parent.name  # <storage_path>/<run.name>/checkpoint_step_*
        for experiment in client.search_experiments():
            run = find_run(client, experiment.experiment_id, RUN_NAME_TAG, run_name)
            outputs = run.outputs.model_outputs if run and run.outputs else []
            for output in sorted(outputs, key=lambda each: each.step, reverse=True):
                if (output.step == weights.step and client.get_logged_model(output.model_id).name
                        == ("model_ema" if ema else "model")):
                    return output.model_id
    except Exception:  # MLflow unreachable, or the source unknown to it: no lineage link
        return ""
    return ""


def check_variant(weights: Weights, model_name: str) -> None:
    """Our checkpoints know their variant: another ``model.name`` is refused by name."""
    saved = weights.model_config
    if saved is not None and saved.name != model_name:
        raise ValueError(f"checkpoint {weights.source!r} is a {saved.name} checkpoint, not "
                         f"model.name={model_name!r}: expected --model {saved.name}")


def load_weights(model: torch.nn.Module, weights: Weights, *, new_head: bool) -> str:
    """Load ``weights`` into ``model`` strictly; returns the load report (one line).

    ``new_head``: a head of another class count is dropped (transfer learning); otherwise it
    is an error naming both counts. Another variant is an error naming the mismatched shapes.
    """
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    check_variant(weights, name)
    try:
        report = load_pretrained(model, weights.checkpoint, strict=True)
    except ValueError as error:
        raise ValueError(f"checkpoint {weights.source!r} does not fit model.name={name!r}: "
                         f"{error}") from None
    if report.head_dropped and not new_head:
        classes = model.head.weight.shape[0]
        raise ValueError(f"checkpoint {weights.source!r} has a head of another class count than "
                         f"model.num_classes={classes}: expected --set model.num_classes=<the "
                         f"checkpoint's classes> (to train a new head use jobs/finetune.py)")
    return str(report)


def model_for(model_config: ModelConfig) -> torch.nn.Module:
    """A fresh CPU model of ``model_config`` (variant, image size, classes, architecture)."""
    return T2TViT(resolve(model_config))


def released_state_dict(weights: Weights, model_config: ModelConfig | None = None
                        ) -> dict[str, torch.Tensor]:
    """fp32 state dict in the released layout (the model's own key order and names, no
    prefixes), checked strictly against the variant when it is known."""
    model_config = model_config or weights.model_config
    if model_config is None:
        checkpoint = weights.checkpoint
        state = next((dict(checkpoint[k]) for k in SUB_DICTS if isinstance(checkpoint.get(k), Mapping)),
                     dict(checkpoint))
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
    else:
        model = model_for(model_config)
        load_weights(model, weights, new_head=False)
        state = model.state_dict()
    return {name: (t.detach().float() if t.is_floating_point() else t.detach()).contiguous().clone()
            for name, t in state.items()}


def save_weights(state: Mapping[str, torch.Tensor], out: str | Path, fmt: str = "",
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as a plain ``torch.save`` state dict or as safetensors (``fmt`` ""
    picks by the file name: ``.safetensors`` or pt)."""
    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "pt")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(dict(state), str(out), metadata=metadata or {})
        # safetensors creates its files 0600 whatever the umask; torch.save follows it
        # (0644 with umask 022): both as any new file of the user's is.
        umask = os.umask(0)
        os.umask(umask)
        out.chmod(0o666 & ~umask)
    else:
        torch.save(dict(state), out)
    return out


def register_model(state: Mapping[str, torch.Tensor], *, model_config: ModelConfig, name: str,
                   alias: str, tracking_uri: str, experiment: str,
                   tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log ``state`` as an MLflow PyTorch model in a new run of ``experiment``, register it as
    ``name`` and point ``alias`` at the new version; returns (version, ``models:/name@alias``)."""
    import mlflow  # ~1 s: only when registering

    model = model_for(model_config)
    model.load_state_dict(dict(state), strict=True)
    mlflow.set_tracking_uri(tracking_uri)
    torch_version = torch.__version__.split("+")[0]
    with mlflow.start_run(experiment_id=experiment_id(tracking_uri, experiment),
                          run_name=f"export-{name}",
                          tags={k: str(v) for k, v in (tags or {}).items()}):
        info = mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=name,
                                        serialization_format="pickle",
                                        pip_requirements=[f"torch=={torch_version}"])
    version = str(info.registered_model_version)
    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"
