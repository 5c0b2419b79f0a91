"""`directpo plot`: curves of DPO, reward-model and PPO runs from metrics.jsonl, overlaid; bad lines named."""
import json
import math

import pytest

from directpo.cli import main
from directpo.eval.curves import figure, plot_runs, present_panels, read_metrics, run_names, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(run_dir, records, tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def _dpo(steps=4, eval_steps=(0, 2, 4), shift=0.0):
    out = []
    for s in range(1, steps + 1):
        out.append({"split": "train", "step": s, "epoch": 0, "loss": 0.69 - 0.05 * s + shift,
                    "rewards/accuracies": 0.5 + 0.1 * s, "rewards/margins": 0.02 * s, "rewards/chosen": 0.01 * s,
                    "rewards/rejected": -0.01 * s, "lr": 1e-4 * min(1, s / 2), "grad_norm": 3.0 / s})
        if s in eval_steps:
            out.append({"split": "eval", "step": s, "loss": 0.7 - 0.04 * s, "rewards/accuracies": 0.5 + 0.05 * s,
                        "rewards/margins": 0.01 * s, "rewards/chosen": 0.0, "rewards/rejected": -0.01 * s})
    return [{"split": "eval", "step": 0, "loss": math.log(2), "rewards/accuracies": 0.0, "rewards/margins": 0.0,
             "rewards/chosen": 0.0, "rewards/rejected": 0.0}] * (0 in eval_steps) + out


def _ppo(steps=3):
    return [{"step": s, "reward": 0.1 * s, "reward_std": 0.2, "kl": 0.5 * s, "kl_coef": 0.1, "policy_loss": -0.1,
             "value_loss": 0.3, "lr": 1e-5, "grad_norm": float("nan") if s == 2 else 1.0} for s in range(1, steps + 1)]


def _rm(steps=3):
    return [{"split": "train", "step": s, "loss": 0.6, "accuracy": 0.7, "rewards/margins": 0.3, "lr": 1e-5,
             "grad_norm": 1.0} for s in range(1, steps + 1)]


def test_panels_follow_the_keys_the_runs_have(tmp_path):
    dpo = read_metrics(_write(tmp_path / "dpo", _dpo()) / "metrics.jsonl")
    ppo = read_metrics(_write(tmp_path / "ppo", _ppo()) / "metrics.jsonl")
    rm = read_metrics(_write(tmp_path / "rm", _rm()) / "metrics.jsonl")
    titles = lambda runs: [t for t, _ in present_panels(runs)]  # noqa: E731
    assert titles([dpo]) == ["loss", "reward accuracy", "reward margin (chosen − rejected)", "rewards",
                             "learning rate", "gradient norm"]
    assert titles([ppo]) == ["reward (PPO)", "KL(π‖πref) (PPO; KTO: its reference point z0)", "learning rate", "gradient norm"]
    assert "reward accuracy" in titles([rm]) and "rewards" not in titles([rm])  # rm's "accuracy" key
    assert titles([dpo, ppo]) == ["loss", "reward accuracy", "reward margin (chosen − rejected)", "rewards",
                                  "reward (PPO)", "KL(π‖πref) (PPO; KTO: its reference point z0)", "learning rate", "gradient norm"]
    # PPO lines have no split: they are train lines
    assert series(ppo, ("kl",), "train") == ([1, 2, 3], [0.5, 1.0, 1.5])
    assert series(ppo, ("kl",), "eval") == ([], [])
    assert series(rm, ("rewards/accuracies", "accuracy"), "train")[1] == [0.7] * 3


def test_train_lines_eval_markers_one_colour_per_run(tmp_path):
    a = read_metrics(_write(tmp_path / "a", _dpo()) / "metrics.jsonl")
    b = read_metrics(_write(tmp_path / "b", _dpo(eval_steps=(), shift=0.1)) / "metrics.jsonl")
    fig = figure([a, b], ["a", "b"], present_panels([a, b]))
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    lines = loss_ax.get_lines()
    train = [ln for ln in lines if ln.get_linestyle() == "-"]
    markers = [ln for ln in lines if ln.get_linestyle() == "None"]
    assert [list(ln.get_xdata()) for ln in train] == [[1, 2, 3, 4], [1, 2, 3, 4]]
    assert list(train[1].get_ydata()) == pytest.approx([0.69 - 0.05 * s + 0.1 for s in range(1, 5)])
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [0, 2, 4]  # run b has no eval lines
    assert markers[0].get_marker() == "o" and markers[0].get_color() == train[0].get_color()
    assert train[0].get_color() != train[1].get_color()
    rewards_ax = next(ax for ax in fig.axes if ax.get_title() == "rewards")  # chosen solid, rejected dashed
    assert {ln.get_linestyle() for ln in rewards_ax.get_lines()} >= {"-", "--"}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a", "b", "train (lines)", "eval (markers)"]
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_runs_writes_an_image(tmp_path):
    _write(tmp_path / "x" / "run", _dpo())
    _write(tmp_path / "y" / "run", _ppo())
    out = tmp_path / "plots" / "curves.png"
    res = plot_runs([tmp_path / "x" / "run", tmp_path / "y" / "run"], out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert res["runs"] == ["x/run", "y/run"]  # same directory names: told apart by their parents
    assert "loss" in res["panels"] and "KL(π‖πref) (PPO; KTO: its reference point z0)" in res["panels"]
    assert not list(out.parent.glob(".*tmp*"))
    svg = plot_runs([tmp_path / "x" / "run"], tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml") and svg["runs"] == ["run"]
    with pytest.raises(ValueError, match="cannot write a .xyz image"):
        plot_runs([tmp_path / "x" / "run"], tmp_path / "c.xyz")


def test_run_names():
    from pathlib import Path

    assert run_names([Path("/r/a"), Path("/r/b")]) == ["a", "b"]
    assert run_names([Path("/p/q/run"), Path("/p/z/run")]) == ["q/run", "z/run"]


def test_malformed_lines_are_named(tmp_path):
    run = _write(tmp_path / "bad", _dpo(steps=2))
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl, line 2: not JSON"):
        read_metrics(path)
    path.write_text(lines[0] + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        read_metrics(path)
    path.write_text(lines[0] + '{"split": "train", "loss": 1}\n')
    with pytest.raises(ValueError, match=r"line 2: no integer \"step\""):
        read_metrics(path)
    path.write_text(lines[0] + '{"split": "test", "step": 1}\n')
    with pytest.raises(ValueError, match=r"line 2: \"split\" must be train or eval"):
        read_metrics(path)
    # a run still writing its last line: that line is left for the next plot
    path.write_text(lines[0] + "\n" + lines[1] + '{"split": "train", "step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_cli_plot(tmp_path, capsys):
    a, b = _write(tmp_path / "a", _dpo()), _write(tmp_path / "b", _rm())
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runs"] == ["a", "b"] and out.read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(a), "--out", str(out)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["plot", str(a), "--out", str(out), "--overwrite"]) == 0
    assert main(["plot", str(a), "--out", str(a / "metrics.jsonl"), "--overwrite"]) == 2  # never an input
    assert "input file" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nope"), "--out", str(out), "--overwrite"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (b / "metrics.jsonl").write_text('{"split": "train", "step": 1}\noops\n{"step": 2}\n')
    assert main(["plot", str(a), str(b), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{b / 'metrics.jsonl'}, line 2: not JSON" in err
