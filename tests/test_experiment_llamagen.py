"""experiments.llamagen_imagenet: bad input fails before compilation; a smoke run end to end."""

import dataclasses
import json
import os

import jax
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
    (["gpt_train.batch_size=12"], ConfigError, "multiple of the 8"),
    (["model.grid=4"], ConfigError, "model.grid"),
    (["model.vocab_size=128"], ConfigError, "codebook_size"),
    (["data.name=imagenet2012", "data.image_size=32"], DataError, "manual download dir"),
    (["gpt_ckpt=/nonexistent/c2i_B_256.pt"], ConfigError, "does not exist"),
    (["speculative.draft_len=-1"], ConfigError, "draft_len"),
    (["speculative.draft_len=2", "draft_model.grid=4"], ConfigError, "draft_model must share"),
    (["speculative.draft_len=2", "speculative.accept=fast"], ConfigError, "accept"),
])
def test_bad_input_fails_before_compilation(overrides, error, match, no_compilation, tmp_path):
    cfg = override(SMOKE, overrides)
    with pytest.raises(error, match=match):
        exp.run(cfg, str(tmp_path), progress=False)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown --config"):
        exp.main(["--config", "digitz"])
    with pytest.raises(ConfigError, match="unknown field 'temprature'"):
        exp.main(["--config", "digits", "--set", "sample.temprature=1"])


def test_digits_smoke_run_on_8_devices_then_resume(tmp_path):
    assert len(jax.devices()) == 8
    summary = exp.run(SMOKE, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    assert summary["sample/forward_passes"] == 64
    assert 0 <= summary["eval/class_accuracy"] <= 1 and summary["eval/fid_digits"] > 0
    for f in ("samples.png", "samples.npz", "summary.json", "codes_train.npz",
              "gpt/tb/metrics.jsonl", "tokenizer/ckpt/3"):
        assert os.path.exists(tmp_path / f), f
    assert os.listdir(tmp_path / "gpt" / "tb")  # TensorBoard event file
    json.load(open(tmp_path / "summary.json"))
    # Longer run in the same work dir resumes the GPT from step 3 (tokenizer is done).
    longer = dataclasses.replace(SMOKE, gpt_train=dataclasses.replace(SMOKE.gpt_train, steps=4))
    exp.run(longer, str(tmp_path), progress=False)
    logs = [json.loads(line) for line in open(tmp_path / "gpt/tb/metrics.jsonl")]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in logs if "eval/fid_digits" in r] == [3, 4]  # at each stage end


@pytest.mark.slow  # the sampler itself is covered by tests/test_speculative.py
def test_digits_speculative_sampling_option(tmp_path):
    cfg = override(SMOKE, ["speculative.draft_len=3", "draft_train.steps=2",
                           "draft_train.batch_size=16", "draft_train.log_every=1",
                           "eval_samples_per_class=0"])
    summary = exp.run(cfg, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    assert os.path.exists(tmp_path / "draft" / "ckpt" / "2")
    assert summary["sample/forward_passes"] <= 64
    assert 0 <= summary["sample/mean_accepted_per_round"] <= 3
    for method in (["speculative.num_drafts=2"], ["speculative.accept=relaxed"],
                   ["speculative.drafter=jacobi", "speculative.accept=group"]):
        summary = exp.run(override(cfg, method), str(tmp_path), progress=False)
        assert summary["sample/forward_passes"] <= 64, method
