"""experiments.llamagen_imagenet: bad input fails before compilation; end-to-end runs (slow)."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from arjax.config import ConfigError, override
from arjax.data import DataError
from experiments import llamagen_imagenet as exp

SMOKE = override(exp.DIGITS, [
    "tokenizer_train.steps=3", "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1",
    "gpt_train.steps=3", "gpt_train.batch_size=16", "gpt_train.log_every=1",
    "samples_per_class=8", "eval_samples_per_class=8", "model.depth=2", "model.dim=64",
])


@pytest.mark.parametrize("overrides,error,match", [
    (["sample.temperature=-1.0"], ConfigError, "temperature"),
    (["sample.top_k=65"], ConfigError, "top_k"),
    (["sample.cfg=-1.0"], ConfigError, "sample.cfg"),
    (["sample.cfg_schedule=cosine"], ConfigError, "cfg_schedule"),
    (["gpt_train.batch_size=12"], ConfigError, "multiple of the 8"),
    (["gpt_train.log_every=0"], ConfigError, "gpt_train.log_every must be >= 1"),
    (["model.grid=4"], ConfigError, "model.grid"),
    (["model.vocab_size=128"], ConfigError, "derived from tokenizer.codebook_size"),
    (["data.name=imagenet2012", "data.image_size=32"], DataError, "manual download dir"),
    (["gpt_ckpt=/nonexistent/c2i_B_256.pt"], ConfigError, "does not exist"),
    (["speculative.draft_len=-1"], ConfigError, "draft_len"),
    (["speculative.draft_len=2", "draft_model.grid=4"], ConfigError, "derived from model.grid"),
    (["speculative.draft_len=2", "speculative.accept=fast"], ConfigError, "accept"),
    (["speculative.draft_len=2", "draft_train.steps=0"], ConfigError, "draft_train.steps"),
])
def test_bad_input_fails_before_compilation(overrides, error, match, no_compilation, tmp_path):
    with pytest.raises(error, match=match):
        exp.run(override(SMOKE, overrides), str(tmp_path), progress=False)


def check_report(folder, summary, per_class, classes):
    """The files a report claims, with contents tied to the data."""
    for f in ("samples.png", "samples.npz", "summary.json"):
        assert os.path.exists(folder / f), f
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder / "tb"))
    saved = json.load(open(folder / "summary.json"))
    assert saved["sample/images"] == per_class * len(classes)
    arrays = np.load(folder / "samples.npz")
    assert arrays["images"].dtype == np.uint8 and arrays["images"].std() > 1
    np.testing.assert_array_equal(arrays["labels"], np.repeat(classes, per_class))
    np.testing.assert_array_equal(arrays["images"], summary["images"])
    return saved, arrays


@pytest.mark.slow
def test_digits_run_on_8_devices_resume_and_resample(tmp_path):
    assert len(jax.devices()) == 8
    summary = exp.run(SMOKE, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    assert summary["sample/target_passes"] == 64  # counted in the sampling loop
    assert 0 < summary["tokenizer/final_mse"] < 4  # images in [-1, 1]
    assert 0 < summary["gpt/test_loss"] < 2 * math.log(64)  # near uniform after 3 steps
    assert 0 <= summary["eval/class_accuracy"] <= 1 and summary["eval/fid_digits"] > 0
    saved, arrays = check_report(tmp_path / "samples" / "step3", summary, 8, range(10))
    assert arrays["tokens"].shape == (80, 64) and arrays["tokens"].max() < 64
    assert saved["config"]["model"]["vocab_size"] == 64
    for stage in ("tokenizer", "gpt"):
        assert any(f.startswith("events.out") for f in os.listdir(tmp_path / stage / "tb"))
    # A longer run in the same work dir resumes the GPT from step 3 (tokenizer done).
    longer = dataclasses.replace(SMOKE, gpt_train=dataclasses.replace(SMOKE.gpt_train, steps=4))
    again = exp.run(longer, str(tmp_path), progress=False)
    logs = [json.loads(line) for line in open(tmp_path / "gpt/tb/metrics.jsonl")]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in logs if "eval/fid_digits" in r] == [3, 4]  # at each stage end
    assert again["tokenizer/final_mse"] == summary["tokenizer/final_mse"]  # not null
    # Re-sampling the finished work dir with other settings: a new report, the old kept.
    resampled = exp.run(override(longer, ["sample.cfg=4.0"]), str(tmp_path), progress=False,
                        tag="cfg4")
    assert resampled["report_dir"].endswith("samples/cfg4")
    assert os.path.exists(tmp_path / "samples" / "step3" / "samples.png")
    assert os.path.exists(tmp_path / "samples" / "step4" / "samples.png")
    # The tokenizer trains on: the cached codes it no longer produces are extracted again.
    before = sorted(os.listdir(tmp_path / "codes"))
    exp.run(override(longer, ["tokenizer_train.steps=4"]), str(tmp_path), progress=False)
    after = sorted(os.listdir(tmp_path / "codes"))
    assert len(after) == len(before) == 2 and not set(after) & set(before)  # train, test


@pytest.mark.slow  # the sampler itself is covered by tests/test_speculative.py
def test_digits_speculative_sampling_option(tmp_path):
    cfg = override(SMOKE, ["speculative.draft_len=3", "draft_train.steps=2",
                           "draft_train.batch_size=16", "draft_train.log_every=1",
                           "eval_samples_per_class=0"])
    # the default drafter and Jacobi decoding; multi-draft and relaxed acceptance are options
    # of the same wiring, covered with the samplers in tests/test_speculative.py
    for method in ([], ["speculative.drafter=jacobi", "speculative.accept=group"]):
        summary = exp.run(override(cfg, method), str(tmp_path), progress=False)
        assert summary["images"].shape == (80, 32, 32, 3)
        # Near-uniform target and draft after a few steps: most drafts are accepted, so the
        # 64 tokens take far fewer target passes (3 drafts + 1 per pass at best: 16).
        assert 16 <= summary["sample/target_passes"] < 40, (method, summary)
        assert summary["sample/mean_accepted_per_round"] > 1, method
        draft_calls = summary["sample/draft_passes"]
        assert draft_calls == (0 if "speculative.drafter=jacobi" in method
                               else 4 * summary["sample/target_passes"]), method
    assert os.path.exists(tmp_path / "draft" / "ckpt" / "2")
