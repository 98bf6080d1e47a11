"""What a sweep shows its user, without Ray running or an MLflow server: the Figure-1 plot
(labels that never overlap, family lines, log axes, the best trial marked), the results
table, the best trial's config and command, ASHA's stop reasons and its last rung."""

import itertools
import types
from pathlib import Path

import pytest

from t2t_dist.config import Config, load_config
from t2t_dist.launch.figure import axes_of, draw_sweep, label, short_value
from t2t_dist.launch.report import Row, best_config, best_row, format_table, train_command

ROOT = Path(__file__).resolve().parents[1]
DEPTH_WIDTH = ["model.depth", "model.embed_dim", "model.num_heads"]


def row(index, values, *, params, gmacs, best, status="completed"):
    return Row(run_name=f"sweep-abcde_{index:05d}", run_id=str(index), values=values,
               params=params, gmacs=gmacs, best=best, steps=184, status=status)


def depth_width_rows(stopped_widths=(16,)):
    """depth {1, 2, 3} x width {16, 32, 64}: cost grows with both, top-1 with width."""
    rows = []
    for index, (depth, width) in enumerate(itertools.product((1, 2, 3), (16, 32, 64))):
        rows.append(row(index, {"model.depth": depth, "model.embed_dim": width,
                                "model.num_heads": width // 16},
                        params=2e4 + depth * width * 600, gmacs=6.8e-4 + depth * width * 2.6e-6,
                        best=30 + width + depth, status="early-stopped"
                        if width in stopped_widths else "completed"))
    return rows


def label_boxes(figure):
    """Each panel's label boxes in pixels (the text alone, without its leader line)."""
    from matplotlib.text import Text

    figure.canvas.draw()  # an annotation's text is positioned when drawn
    renderer = figure.canvas.get_renderer()
    return [[Text.get_window_extent(text, renderer) for text in axis.texts]
            for axis in figure.axes]


def overlapping(boxes):
    return [(a, b) for a, b in itertools.combinations(boxes, 2)
            if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1]


def test_short_labels_drop_heads_that_follow_the_width():
    rows = depth_width_rows()
    assert axes_of(rows, DEPTH_WIDTH) == ["model.depth", "model.embed_dim"]
    assert label(rows[5], ["model.depth", "model.embed_dim"]) == "d2 w64"
    assert label(row(0, {"optim.lr": 0.0032, "model.name": "vit_se"}, params=1, gmacs=1,
                     best=1), ["model.name", "optim.lr"]) == "vit_se lr 3.2e-3"
    assert [short_value(v) for v in (64, 0.05, 1.0e-4, 0.25, 2.0)] == ["64", "0.05", "1e-4",
                                                                        "0.25", "2"]


def test_labels_never_overlap_even_where_points_crowd():
    import matplotlib.pyplot as plt

    # Eleven trials within 2% of each other in cost and 1.5 points in top-1, and one far
    # away that stretches the axes: the eleven are one blob of markers.
    rows = [row(i, {"optim.lr": 1e-3 * (1 + i / 10), "model.depth": 2 + i % 3},
                params=1e5 * (1 + i / 500), gmacs=1e-3 * (1 + i / 500), best=90 + i / 8)
            for i in range(11)]
    rows.append(row(11, {"optim.lr": 1e-5, "model.depth": 8}, params=8e5, gmacs=8e-3, best=20,
                    status="early-stopped"))
    figure = draw_sweep(rows, ["optim.lr", "model.depth"], title="crowd", metric="val/top1")
    for boxes, axis in zip(label_boxes(figure), figure.axes):
        assert len(boxes) == 12 and not overlapping(boxes)
        inside = axis.get_window_extent(figure.canvas.get_renderer())
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)
    plt.close(figure)


def test_families_are_joined_by_lines_and_the_best_is_a_star():
    import matplotlib.pyplot as plt

    rows = depth_width_rows()
    figure = draw_sweep(rows, DEPTH_WIDTH, title="dw", metric="val/top1")
    macs = figure.axes[0]
    # One line per width over the depths (3 values each: the first swept number is the
    # line): two segments each, dotted between trials stopped early (width 16).
    segments = [line for line in macs.lines if len(line.get_xdata()) == 2]
    assert len(segments) == 3 * 2
    assert sorted(line.get_linestyle() for line in segments) == ["-"] * 4 + [":"] * 2
    stars = [c for c in macs.collections if c.get_sizes()[0] > 100]
    assert len(stars) == 1 and tuple(stars[0].get_offsets()[0]) == pytest.approx(
        (rows[-1].gmacs * 1e3, rows[-1].best))  # d3 w64, in MMACs
    assert macs.get_xscale() == "linear" and macs.get_xlabel() == "MMACs per image"
    assert figure._suptitle.get_text().endswith("(9 trials, best d3 w64: 97.0)")
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert {"w16, over depth", "early-stopped (ASHA)", "best"} <= set(legend)
    plt.close(figure)


def test_costs_spanning_a_decade_get_a_log_axis_and_equal_costs_plot_the_swept_numbers():
    import matplotlib.pyplot as plt

    names = ["t2t_vit_14", "vit_s_16", "vit_ghost"]
    rows = [row(i, {"model.name": name}, params=p, gmacs=g, best=b) for i, (name, p, g, b)
            in enumerate(zip(names, (2.9e5, 1.3e5, 1.0e5), (5.8e-3, 6.1e-4, 4.7e-4), (95, 92, 88)))]
    figure = draw_sweep(rows, ["model.name"], title="arch", metric="val/top1")
    assert [a.get_xscale() for a in figure.axes] == ["log", "linear"]
    assert {t.get_text() for t in figure.axes[0].texts} == set(names)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == ["T2T-ViT", "ViT"]  # families by colour, no lines between designs
    plt.close(figure)

    lrs = [1e-4, 5e-4, 2e-3, 8e-3]
    rows = [row(i, {"optim.lr": lr, "optim.weight_decay": 0.01 + i / 50}, params=9.4e4,
                gmacs=1.04e-3, best=50 + 10 * i) for i, lr in enumerate(lrs)]
    figure = draw_sweep(rows, ["optim.lr", "optim.weight_decay"], title="hp", metric="val/top1")
    assert [a.get_xlabel() for a in figure.axes] == ["optim.lr", "optim.weight_decay"]
    assert [a.get_xscale() for a in figure.axes] == ["log", "linear"]
    plt.close(figure)


def test_table_ranks_best_first_with_the_stop_reason_and_plot_is_a_png(tmp_path):
    from t2t_dist.launch.figure import plot_sweep

    rows = [row(0, {"model.name": "a"}, params=1e6, gmacs=0.5, best=40.0, status="early-stopped"),
            row(1, {"model.name": "b"}, params=2e6, gmacs=1.0, best=70.0),
            row(2, {"model.name": "c"}, params=3e6, gmacs=1.5, best=float("nan"), status="failed")]
    rows[0].reason = "ASHA at epoch 2: val/top1 40.0 < 70.0 (rung bar)"
    table = format_table(rows, ["model.name"], "val/top1").splitlines()
    assert [line.split()[1] for line in table[2:]] == ["b", "a", "c"]
    assert table[3].endswith("early-stopped  ASHA at epoch 2: val/top1 40.0 < 70.0 (rung bar)")
    assert best_row(rows) is rows[1] and best_row(rows, "min") is rows[0]
    plot_sweep(rows, tmp_path / "p.png", ["model.name"], title="t", metric="val/top1")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_best_config_is_a_run_of_its_own_and_the_command_trains_it(tmp_path):
    sweep = load_config(ROOT / "jobs" / "configs" / "sweep_depth_width_digits.yaml")
    best = row(3, {"model.depth": 1, "model.embed_dim": 64, "model.num_heads": 4},
               params=6e4, gmacs=8.7e-4, best=94.3)
    config = best_config(sweep, best)
    assert (config.model.depth, config.model.embed_dim, config.model.num_heads) == (1, 64, 4)
    assert config.run.name == "depth-width-digits-best" and config.tune == Config().tune
    assert config.optim.epochs == sweep.optim.epochs and config.run.storage_path == "./runs"

    def parent(uri):
        return types.SimpleNamespace(info=types.SimpleNamespace(artifact_uri=uri, run_id="p1"))

    local = train_command(parent("file:///data/mlartifacts/1/p1/artifacts"), "sqlite:///m.db")
    assert local == ("python jobs/pretrain.py --config "
                     "/data/mlartifacts/1/p1/artifacts/best_config.yaml")
    remote = train_command(parent("s3://bucket/mlflow/1/p1/artifacts"), "http://mlflow:5000")
    assert remote == ('python jobs/pretrain.py --config "$(MLFLOW_TRACKING_URI=http://mlflow:5000 '
                      'mlflow artifacts download -r p1 -a best_config.yaml)"')


@pytest.fixture(scope="module")
def asha():
    from t2t_dist.launch.tune import asha_scheduler

    config = load_config(ROOT / "jobs" / "configs" / "sweep_depth_width_digits.yaml")
    scheduler = asha_scheduler(config)  # 8 epochs, grace 2, reduction factor 2
    scheduler.set_search_properties("val/top1", "max")  # what the Tuner does
    return scheduler


def trial(name, epoch=0):
    return types.SimpleNamespace(trial_id=name, last_result={"epoch": epoch})


def test_asha_says_why_it_stopped_a_trial_and_never_stops_one_at_its_last_epoch(asha):
    from ray.tune.schedulers import TrialScheduler

    from t2t_dist.launch.tune import stop_reason

    trials = {name: trial(name) for name in "abcd"}
    for t in trials.values():
        asha.on_trial_add(None, t)

    def report(name, epoch, top1):
        trials[name].last_result = {"epoch": epoch}
        return asha.on_trial_result(None, trials[name], {"training_iteration": epoch,
                                                         "val/top1": top1})

    assert report("a", 1, 30.0) == TrialScheduler.CONTINUE  # before the first rung
    assert report("a", 2, 70.0) == TrialScheduler.CONTINUE  # first at the rung: no bar yet
    assert report("b", 2, 40.0) == TrialScheduler.STOP
    assert stop_reason(trials["b"], metric="val/top1", epochs=8, scheduler=asha) == \
        "ASHA at epoch 2: val/top1 40.0 < 70.0 (rung bar)"
    assert report("c", 2, 50.0) == TrialScheduler.STOP  # bar: the median of 70 and 40
    assert asha.stops["c"] == (2, 50.0, pytest.approx(55.0))
    for epoch, top1 in [(4, 90.0), (6, 93.0)]:
        assert report("a", epoch, top1) == TrialScheduler.CONTINUE
    assert report("d", 2, 80.0) == TrialScheduler.CONTINUE
    assert report("d", 4, 95.0) == TrialScheduler.CONTINUE
    # Rungs at 2 and 4 only: the last report (epoch 8) is never a rung, however low.
    assert report("a", 8, 1.0) == TrialScheduler.CONTINUE
    assert stop_reason(trials["a"], metric="val/top1", epochs=8, scheduler=asha) == "completed"
    assert stop_reason(trial("e", 3), metric="val/top1", epochs=8, scheduler=asha) == \
        "stopped by Tune after epoch 3 of 8"
