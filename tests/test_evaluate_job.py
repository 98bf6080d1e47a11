"""jobs/evaluate.py and jobs/finetune.py on bad input: one line naming what is wrong, exit 2,
before any Ray resources are taken. (The Ray runs: test_evaluate_finetune_export.py.)"""

import re
import sys
from pathlib import Path

import pytest
import torch

from t2t_dist.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import evaluate as evaluate_job  # noqa: E402  (jobs/evaluate.py)
import finetune as finetune_job  # noqa: E402  (jobs/finetune.py)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """t2t_vit_tiny weights with a 10-class and with a 5-class head."""
    root = tmp_path_factory.mktemp("weights")
    for classes in (10, 5):
        torch.manual_seed(0)
        model = create_model("t2t_vit_tiny", img_size=32, num_classes=classes)
        torch.save({"state_dict_ema": model.state_dict()}, root / f"tiny{classes}.pth.tar")
    return root


def run_main(main, argv, capsys):
    import ray

    connected = ray.is_initialized()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # MLflow may log INFO lines first
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    error = errors[0]
    assert ray.is_initialized() == connected  # no Ray started for bad input
    return error


@pytest.mark.parametrize("model, checkpoint, extra, message", [
    ("t2t_vit_mini", "tiny10.pth.tar", ["model.num_classes=10"],
     r"checkpoint '.*tiny10.pth.tar' does not fit model.name='t2t_vit_mini': .*skipped .*cls_token "
     r"\[1, 1, 32\] vs \[1, 1, 128\]"),
    ("t2t_vit_tiny", "nope.pth", ["model.num_classes=10"],
     r"checkpoint '.*nope.pth' does not exist: expected a weights file, a run's checkpoint folder"),
    ("t2t_vit_tiny", "tiny5.pth.tar", [],
     r"model.num_classes=1000 is invalid: the validation shards have 10 classes; expected "
     r"--set model.num_classes=10"),
    ("t2t_vit_tiny", "tiny5.pth.tar", ["model.num_classes=10"],
     r"checkpoint '.*tiny5.pth.tar' has a head of another class count than model.num_classes=10"),
    ("t2t_vit_tiny", "models:/no-such-model@candidate", ["model.num_classes=10"],
     r"checkpoint 'models:/no-such-model@candidate' cannot be loaded from MLflow"),
])
def test_evaluate_bad_input(model, checkpoint, extra, message, tiny_files, digits_shards,
                            tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = checkpoint if checkpoint.startswith("models:/") else str(tiny_files / checkpoint)
    argv = ["--model", model, "--checkpoint", source, "--data", digits_shards["val"],
            "--set", "model.img_size=32", "--set", f"run.tracking_uri=sqlite:///{tmp_path}/m.db"]
    for item in extra:
        argv += ["--set", item]
    error = run_main(evaluate_job.main, argv, capsys)
    assert error.startswith("evaluate: error: ")
    assert re.search(message, error), error


@pytest.mark.parametrize("extra, message", [
    ([], r"model.pretrained is empty: expected --pretrained"),
    (["--pretrained", "TINY", "--set", "model.num_classes=5"],
     r"model.num_classes=5 is invalid: expected 10, the classes of the training shards"),
    (["--pretrained", "missing-run"], r"checkpoint 'missing-run' does not exist"),
    (["--pretrained", "TINY", "--set", "model.name=t2t_vit_mini"],
     r"does not fit model.name='t2t_vit_mini'"),
])
def test_finetune_bad_input(extra, message, tiny_files, digits_shards, tmp_path, capsys,
                            monkeypatch):
    config = str(Path(finetune_job.__file__).parent / "configs" / "finetune_digits.yaml")
    monkeypatch.chdir(tmp_path)
    extra = [str(tiny_files / "tiny10.pth.tar") if item == "TINY" else item for item in extra]
    argv = ["--config", config, "--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}", "--set", "model.name=t2t_vit_tiny",
            "--set", f"run.storage_path={tmp_path}/runs", *extra]
    error = run_main(finetune_job.main, argv, capsys)
    assert error.startswith("finetune: error: ")
    assert re.search(message, error), error
