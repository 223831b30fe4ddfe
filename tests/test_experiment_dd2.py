"""experiments.dd2_imagenet: bad input fails before compilation; a smoke run end to end on
the 8 simulated devices (teacher, teacher samples, GTS head-only and whole, CSD, one-step and
teacher-refined sampling, outputs)."""

import json
import os

import numpy as np
import pytest
from test_experiment_dd import TEACHER
from test_experiment_llamagen import check_report

from arjax.config import ConfigError, override
from experiments import dd2_imagenet as exp

STAGES = [f"{s}.{a}" for s in ("head_train", "gts_train", "csd_train")
          for a in ("steps=2", "batch_size=16", "log_every=1", "optim.warmup_steps=1")]
SMOKE = ([f"var.{a}" for a in TEACHER["var"]] + STAGES
         + ["pairs=64", "pair_batch=32", "score.head_width=16", "score.head_depth=1",
            "score.copies=2", "guide_updates=2", "samples_per_class=1",
            "sample_classes=[0,1,2,3,4,5,6,7]", "eval_samples_per_class=0"])


def smoke(*extra: str):
    return override(exp.DIGITS_VAR, SMOKE + list(extra))


@pytest.mark.parametrize("overrides,match", [
    (["score.t_min=0.0"], "t_min"),
    (["score.copies=0"], "score.copies"),
    (["guide_updates=0"], "guide_updates"),
    (["sample.teacher_scales=6"], "teacher_scales"),
    (["csd_train.steps=0"], "csd_train.steps"),
    (["gts_train.batch_size=12"], "multiple of the 8"),
    (["var.sample.smooth=true"], "hard codes"),
    (["pairs=8"], "pairs=8"),
    (["guide_optim.lr=-1.0"], "guide_optim"),
])
def test_bad_input_fails_before_compilation(overrides, match, no_compilation, tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(smoke(*overrides), str(tmp_path), progress=False)


@pytest.mark.slow
def test_digits_run_on_8_devices(tmp_path, devices):
    summary = exp.run(smoke(), str(tmp_path), progress=False)
    assert summary["images"].shape == (8, 32, 32, 3)
    assert summary["sample/target_passes"] == 1  # one generator pass, counted
    _, arrays = check_report(tmp_path / "samples" / "step2", summary, 1, range(8))
    assert arrays["tokens"].shape == (8, 130) and arrays["tokens"].max() < 64
    for f in ("teacher/var/ckpt/2", "gts_head/ckpt/2", "gts/ckpt/2", "csd/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    logs = [json.loads(line) for line in open(tmp_path / "csd/tb/metrics.jsonl")]
    assert {"train/loss", "train/fcs", "train/csd_gap"} <= set(logs[0])
    gts = [json.loads(line) for line in open(tmp_path / "gts/tb/metrics.jsonl")]
    assert "train/gts_mse" in gts[0]
    # the finished work dir samples teacher-refined without training again
    refined = exp.run(smoke("sample.teacher_scales=2"), str(tmp_path), progress=False)
    assert refined["sample/teacher_passes"] == 2 and refined["sample/target_passes"] == 3
    assert np.asarray(refined["images"]).shape == (8, 32, 32, 3)
