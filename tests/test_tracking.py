"""W&B tracking: offline runs are written and read back; disabled runs write nothing."""

from __future__ import annotations

import pytest

from l2o.tracking import Tracker, read_offline_run


def test_offline_run_directory_holds_the_logged_metrics(tmp_path):
    config = {"seed": 7, "estimator": {"name": "pes", "truncation": 10}}
    with Tracker(config, project="l2o-test", mode="offline", dir=tmp_path) as tracker:
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            tracker.log({"meta_loss": loss, "meta_grad_norm": 10.0 * loss}, step=step)
        tracker.summary({"final_meta_loss": 1.5})
        run_dir = tracker.run_dir

    assert run_dir.parent == tmp_path / "wandb"
    assert run_dir.name.startswith("offline-run-")
    run = read_offline_run(run_dir)
    rows = [r for r in run["history"] if "meta_loss" in r]
    assert [r["meta_loss"] for r in rows] == [3.0, 2.0, 1.5]
    assert [r["meta_grad_norm"] for r in rows] == [30.0, 20.0, 15.0]
    assert [r["_step"] for r in rows] == [0, 1, 2]
    assert run["summary"]["final_meta_loss"] == 1.5
    assert run["config"] == config


def test_disabled_mode_writes_nothing(tmp_path):
    with Tracker({"seed": 0}, mode="disabled", dir=tmp_path / "runs") as tracker:
        tracker.log({"meta_loss": 1.0}, step=0)
        tracker.summary({"x": 1})
        assert not tracker.enabled
    assert not (tmp_path / "runs").exists()


def test_tensor_values_are_logged_as_numbers(tmp_path):
    import torch

    with Tracker(mode="offline", dir=tmp_path) as tracker:
        tracker.log({"meta_loss": torch.tensor(0.25)}, step=0)
        run_dir = tracker.run_dir
    assert read_offline_run(run_dir)["history"][0]["meta_loss"] == 0.25


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"wandb\.mode"):
        Tracker(mode="sometimes")
