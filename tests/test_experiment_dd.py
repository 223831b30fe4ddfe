"""experiments.dd_imagenet: bad input fails before compilation; smoke runs end to end on the 8
simulated devices for both teachers (teacher, flow-map pairs, student, 1/2-step and
teacher-involved sampling, outputs; for VAR then DD2 on the same teacher and pairs)."""

import json
import os

import numpy as np
import pytest
from test_experiment_llamagen import check_report

from arjax.config import ConfigError, override
from experiments import dd_imagenet as exp

TEACHER = {"llamagen": [
    "tokenizer.ch=8", "tokenizer.norm_groups=4", "tokenizer_train.steps=2",
    "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1", "gpt_train.steps=2",
    "gpt_train.batch_size=16", "gpt_train.log_every=1", "gpt_train.eval_every=0",
    "eval_samples_per_class=0", "model.depth=1", "model.dim=32", "model.heads=2"],
    "var": [
    "tokenizer.ch=8", "tokenizer.norm_groups=4", "tokenizer_train.steps=2",
    "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1", "var_train.steps=2",
    "var_train.batch_size=16", "var_train.log_every=1", "var_train.eval_every=0",
    "eval_samples_per_class=0", "model.depth=1", "model.width=32", "model.heads=2"]}
COMMON = ["pairs=64", "pair_batch=32", "student_train.steps=2", "student_train.batch_size=16",
          "student_train.log_every=1", "student_train.optim.warmup_steps=1",
          "samples_per_class=1", "sample_classes=[0,1,2,3,4,5,6,7]",
          "eval_samples_per_class=0"]


def smoke(family: str, *extra: str):
    base = exp.DIGITS_LLAMAGEN if family == "llamagen" else exp.DIGITS_VAR
    return override(base, [f"{family}.{a}" for a in TEACHER[family]] + COMMON + list(extra))


@pytest.mark.parametrize("family,overrides,match", [
    ("llamagen", ["timesteps=[0,64]"], "timesteps"),
    ("var", ["timesteps=[0,6]"], "timesteps"),
    ("llamagen", ["sample.steps=[1]"], "sample.steps"),
    ("llamagen", ["sample.split=65"], "sample.split"),
    ("var", ["sample.teacher_start=3", "sample.steps=[0,3]"], "teacher_start"),
    ("llamagen", ["sample.teacher_start=20", "sample.steps=[0,20]"], "teacher_start"),
    ("llamagen", ["pairs=8"], "pairs=8"),
    ("llamagen", ["pair_batch=12"], "multiple of the 8"),
    ("llamagen", ["flow.t_min=0.5"], "t_min"),
    ("llamagen", ["flow.solver=rk4"], "flow.solver"),
    ("llamagen", ["llamagen.sample.temperature=0.0"], "temperature > 0"),
    ("var", ["var.sample.smooth=true"], "hard codes"),
    ("llamagen", ["llamagen.model.grid=4"], "model.grid"),
    ("llamagen", ["student_ckpt=/nonexistent/llamagen-B.pt"], "does not exist"),
    ("llamagen", ["student_train.batch_size=12"], "multiple of the 8"),
])
def test_bad_input_fails_before_compilation(family, overrides, match, no_compilation,
                                            tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(smoke(family, *overrides), str(tmp_path), progress=False)


def test_both_teachers_at_once_is_refused(no_compilation, tmp_path):
    import dataclasses
    cfg = dataclasses.replace(smoke("llamagen"), var=exp.DIGITS_VAR.var)
    with pytest.raises(ConfigError, match="exactly one teacher"):
        exp.run(cfg, str(tmp_path), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_digits_run_on_8_devices(family, tmp_path, devices):
    summary = exp.run(smoke(family), str(tmp_path), progress=False)
    assert summary["images"].shape == (8, 32, 32, 3)
    assert summary["sample/target_passes"] == 1  # one student pass, counted
    _, arrays = check_report(tmp_path / "samples" / "step2", summary, 1, range(8))
    length = 64 if family == "llamagen" else 130
    assert arrays["tokens"].shape == (8, length) and arrays["tokens"].max() < 64
    pairs = [d for d in os.listdir(tmp_path / "codes") if d.startswith("pairs-")]
    assert len(pairs) == 1
    manifest = json.load(open(tmp_path / "codes" / pairs[0] / "manifest.json"))
    assert manifest["num_examples"] == 64 and manifest["item_shape"] == [length]
    for f in ("teacher/tokenizer/ckpt/2", "student/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    logs = [json.loads(line) for line in open(tmp_path / "student/tb/metrics.jsonl")]
    assert {"train/ce", "train/mse", "train/accuracy"} <= set(logs[0])
    # a second run on the finished work dir samples in two steps (and, for the raster
    # teacher, teacher-involved) without training anything again
    two = exp.run(smoke(family, "sample.steps=[0,2]"), str(tmp_path), progress=False)
    assert two["sample/target_passes"] == 2
    t2 = 4 if family == "llamagen" else 3
    mixed = exp.run(smoke(family, f"sample.steps=[0,{t2}]", "sample.teacher_start=1"),
                    str(tmp_path), progress=False)
    # a student pass, the teacher on units 1..t2-1 (LlamaGen: + one prefill pass of token 0;
    # VAR prefills inside its first scale's pass), the last student pass
    teacher_passes = t2 if family == "llamagen" else t2 - 1
    assert mixed["sample/teacher_passes"] == teacher_passes
    assert mixed["sample/student_passes"] == 2
    assert np.asarray(mixed["images"]).shape == (8, 32, 32, 3)
    if family == "var":  # DD2 on the same teacher and pairs (its stages only)
        from test_experiment_dd2 import check_digits_run

        check_digits_run(tmp_path)
