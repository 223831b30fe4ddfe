"""experiments.mar_imagenet: bad input fails before compilation; a 2-step smoke run end to end
on the 8 simulated devices (KL-VAE, moment extraction, MAR, sampling, outputs)."""

import json
import os

import pytest
from test_experiment_llamagen import check_report

from arjax.config import ConfigError, override
from experiments import mar_imagenet as exp

SMOKE = override(exp.DIGITS, [
    "tokenizer.ch=8", "tokenizer.norm_groups=4",
    "tokenizer_train.steps=2", "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1",
    "mar_train.steps=2", "mar_train.batch_size=16", "mar_train.log_every=1",
    "mar_train.eval_every=0", "mar_train.optim.total_steps=2", "mar_train.optim.warmup_steps=1",
    "samples_per_class=1", "sample_classes=[0,1,2,3,4,5,6,7]", "eval_samples_per_class=0",
    "model.depth=1", "model.width=32", "model.heads=2", "model.head_width=32",
    "model.head_depth=1", "sample.num_iter=4", "sample.diffusion_steps=5",
    "draft_model.width=16", "draft_model.heads=2", "draft_model.head_width=16",
    "draft_train.steps=2", "draft_train.batch_size=16", "draft_train.log_every=1",
    "draft_train.optim.total_steps=2", "draft_train.optim.warmup_steps=1",
    "speculative.num_draft=2", "speculative.ratio=0.25",
])


@pytest.mark.parametrize("overrides,match", [
    (["sample.num_iter=0"], "num_iter must be >= 1"),
    (["sample.num_iter=65"], "must be <= the 64 tokens"),
    (["sample.cfg_schedule=cosine"], "cfg_schedule"),
    (["sample.diffusion_steps=2000"], "diffusion_steps"),
    (["model.side=16"], "latent side"),
    (["model.heads=5"], "divisible by heads"),
    (["model.mask_ratio_min=0"], "mask_ratio_min"),
    (["model.token_dim=16"], "derived from tokenizer.embed_dim"),
    (["mar_train.batch_size=12"], "multiple of the 8"),
    (["mar_ckpt=/nonexistent/checkpoint-last.pth"], "does not exist"),
    (["speculative.enabled=true", "speculative.rule=fast"], "speculative.rule"),
    (["speculative.enabled=true", "draft_model.num_classes=5"], "draft_model must have"),
    (["speculative.enabled=true", "draft_ckpt=/nonexistent/b.pth"], "does not exist"),
])
def test_bad_input_fails_before_compilation(overrides, match, no_compilation, tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(override(SMOKE, overrides), str(tmp_path), progress=False)


@pytest.mark.slow
def test_digits_run_on_8_devices_with_cspd(tmp_path, devices):
    summary = exp.run(override(SMOKE, ["speculative.enabled=true"]), str(tmp_path),
                      progress=False)
    assert summary["images"].shape == (8, 32, 32, 3)
    # counted in the sampler: steps 0-1 by the target (<= 0.25 * 4), then draft steps 2 and 3,
    # each its own window (verified after step 2: 2 % 2 == 0, and after the last step)
    assert summary["sample/target_passes"] == 4 and summary["sample/draft_passes"] == 2
    assert 0 <= summary["sample/acceptance"] <= 1
    assert 0 < summary["sample/latent_rms"] < float("inf")  # counted from the samples
    assert summary["tokenizer/latent_scale"] > 0 and summary["draft/params"] > 0
    _, arrays = check_report(tmp_path / "samples" / "step2", summary, 1, range(8))
    assert arrays["latents"].shape == (8, 8, 8, 4)
    for f in ("tokenizer/ckpt/2", "mar/ckpt/2", "draft/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    logs = [json.loads(line) for line in open(tmp_path / "mar/tb/metrics.jsonl")]
    steps = [r for r in logs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and "train/mask_ratio" in steps[0]
