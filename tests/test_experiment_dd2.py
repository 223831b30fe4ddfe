"""experiments.dd2_imagenet: bad input fails before compilation; `check_digits_run`, the
end-to-end smoke run on 8 simulated devices (GTS head-only and whole, CSD, one-step and
teacher-refined sampling, outputs), runs inside `test_experiment_dd`'s VAR run, whose teacher
and pairs it reuses."""

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


def check_digits_run(workdir) -> None:
    """DD2 on a work dir where DD1's VAR smoke run (`test_experiment_dd`, the same teacher
    and pair settings) left its teacher and pairs: only DD2's stages train (8 devices)."""
    summary = exp.run(smoke(), str(workdir), progress=False, tag="dd2")
    assert summary["images"].shape == (8, 32, 32, 3)
    assert summary["sample/target_passes"] == 1  # one generator pass, counted
    _, arrays = check_report(workdir / "samples" / "dd2", summary, 1, range(8))
    assert arrays["tokens"].shape == (8, 130) and arrays["tokens"].max() < 64
    assert len([d for d in os.listdir(workdir / "codes") if d.startswith("pairs-")]) == 1
    for f in ("gts_head/ckpt/2", "gts/ckpt/2", "csd/ckpt/2"):
        assert os.path.exists(workdir / f), f
    logs = [json.loads(line) for line in open(workdir / "csd/tb/metrics.jsonl")]
    assert {"train/loss", "train/fcs", "train/csd_gap"} <= set(logs[0])
    gts = [json.loads(line) for line in open(workdir / "gts/tb/metrics.jsonl")]
    assert "train/gts_mse" in gts[0]
    # the finished work dir samples teacher-refined without training again
    refined = exp.run(smoke("sample.teacher_scales=2"), str(workdir), progress=False)
    assert refined["sample/teacher_passes"] == 2 and refined["sample/target_passes"] == 3
    assert np.asarray(refined["images"]).shape == (8, 32, 32, 3)
