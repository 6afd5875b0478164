"""The article sweep's figures and summary (experiments/plot_article.py), from
results alone: BN runs that measured precise BN get their own curve and
columns, with the cost per evaluation; results without it keep the table
they always had."""

import dataclasses
import json

from bnjax.training.config import TrainConfig
from experiments import article, plot_article


def fake_run(config: TrainConfig, final: float, precise: list[float] | None) -> dict:
    steps = [3000, 4000, 5625]  # the last two in the last epoch (steps 3751-5625)
    run = {"config": config.to_dict(), "steps": steps, "val_accuracy": [0.5, 0.6, final],
           "val_loss": [1.0, 0.9, 0.8], "train_accuracy": [0.5, 0.7, 0.9], "train_loss": [1.0, 0.8, 0.6],
           "wall_time_s": [1.0, 2.0, 3.0], "diverged": False, "precise_val_accuracy": [],
           "eval_statistics_time_s": 0.0}
    if precise is not None:
        run["precise_val_accuracy"] = precise
        run["eval_statistics_time_s"] = 0.75 * len(steps)  # 0.75 s per evaluation
    return run


def write_results(tmp_path, precise_bn: bool):
    configs = article.sweep_configs("article", seeds=2, epochs=3, max_steps=None, precise_bn=precise_bn)
    assert all((c.eval_statistics == "precise") == (precise_bn and c.batch_norm) for c in configs)
    runs = [fake_run(c, 0.80 + 0.01 * c.seed, [0.96, 0.97, 0.98 + 0.01 * c.seed] if c.eval_statistics == "precise"
                     else None) for c in configs]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"environment": {}, "dataset": "mnist", "runs": runs}))
    return path


def test_precise_bn_gets_a_column_its_swing_and_its_cost(tmp_path):
    plot_article.plot_all(write_results(tmp_path, precise_bn=True))
    summary = (tmp_path / "summary.md").read_text()
    assert "precise BN statistics" in summary and "0.75 s per evaluation" in summary
    assert "| plain swing | BN swing | BN precise | BN precise swing |" in summary
    # plain and BN runs of a setting stay one row although only BN measured precise BN
    rows = [line for line in summary.splitlines() if line.startswith("| 0.0")]
    assert len(rows) == 3
    # BN precise final 0.98 / 0.99: 0.9850 ± 0.0050; last-epoch swings 0.01 / 0.02: 0.0150
    assert rows[0].endswith("| 0.9850 ± 0.0050 (n=2) | 0.0150 |"), rows[0]
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_results_without_precise_bn_keep_the_older_table(tmp_path):
    plot_article.plot_all(write_results(tmp_path, precise_bn=False))
    summary = (tmp_path / "summary.md").read_text()
    assert "precise" not in summary
    assert summary.splitlines()[2].endswith("| plain swing | BN swing |")


def test_a_figure_keeps_its_legend_off_the_curves_and_says_its_size_and_seeds():
    config = TrainConfig(batch_norm=True, activation="sigmoid", learning_rate=0.01, max_steps=200,
                         eval_statistics="precise")
    runs = {False: [fake_run(dataclasses.replace(config, batch_norm=False, eval_statistics="running"), 0.1, None)],
            True: [fake_run(config, 0.9, [0.9, 0.95, 0.97])]}
    setting = dict(plot_article.group_runs(runs[False] + runs[True]).popitem()[0])
    figure = plot_article.group_figure(setting, runs)
    axes = figure.axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "BN validation (1 seed)" in labels and not any("1 seeds" in label for label in labels)
    assert axes.get_title().endswith("200 steps only")
    renderer = figure.canvas.get_renderer()
    legend_box, axes_box = axes.get_legend().get_window_extent(renderer), axes.get_window_extent(renderer)
    assert legend_box.y1 <= axes_box.y0  # below the plotting area: over no curve
    assert all(line.get_marker() == "o" for line in axes.get_lines())  # 3 points: each marked
    assert plot_article.title_of({**setting, "max_steps": None}, "MNIST").endswith("batch 32")  # the recipe: no size
