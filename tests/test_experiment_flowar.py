"""experiments.flowar_imagenet: bad input fails before compilation; a 2-step smoke run end to
end on the 8 simulated devices (KL-VAE, moment extraction, FlowAR, sampling, outputs)."""

import json
import os

import pytest
from test_experiment_llamagen import check_report

from arjax.config import ConfigError, override
from experiments import flowar_imagenet as exp

SMOKE = override(exp.DIGITS, [
    "tokenizer.ch=8", "tokenizer.norm_groups=4",
    "tokenizer_train.steps=2", "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1",
    "flowar_train.steps=2", "flowar_train.batch_size=16", "flowar_train.log_every=1",
    "flowar_train.eval_every=0", "flowar_train.optim.total_steps=2",
    "flowar_train.optim.warmup_steps=1", "samples_per_class=1", "sample_classes=[0,1,2,3,4,5,6,7]",
    "eval_samples_per_class=0", "model.depth=1", "model.width=32", "model.heads=2",
    "model.head_width=64", "model.head_depth=1", "sample.num_steps=4",
])


@pytest.mark.parametrize("overrides,match", [
    (["sample.solver=rk4"], "solver"),
    (["sample.cfg=-0.5"], "cfg"),
    (["flowar_train.log_every=0"], "flowar_train.log_every must be >= 1"),
    (["flowar_train.optim.total_steps=1"], "flowar_train.optim.total_steps > "),
    (["sample.disa_min_steps=9"], "disa_min_steps"),
    (["flowar_train.batch_size=12"], "multiple of the 8"),
    (["model.token_dim=16"], "derived from tokenizer.embed_dim"),
    (["model.scales=[1,2,4]"], "latent side"),
    (["model.scales=[1,4,2,8]"], "scales must start at 1 and increase"),
    (["flowar_ckpt=/nonexistent/FlowAR-S.pth"], "does not exist"),
    (["tokenizer_ckpt=/nonexistent/kl16.ckpt"], "does not exist"),
])
def test_bad_input_fails_before_compilation(overrides, match, no_compilation, tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(override(SMOKE, overrides), str(tmp_path), progress=False)


@pytest.mark.slow
def test_digits_run_on_8_devices(tmp_path, devices):
    summary = exp.run(SMOKE, str(tmp_path), progress=False)
    assert summary["images"].shape == (8, 32, 32, 3)
    # counted in the sampler: 4 trunk passes, 4 scales x 4 Euler steps
    assert summary["sample/target_passes"] == 4 and summary["sample/nfe"] == 4 * 4
    assert summary["tokenizer/latent_scale"] > 0 and 0 < summary["tokenizer/final_mse"] < 4
    _, arrays = check_report(tmp_path / "samples" / "step2", summary, 1, range(8))
    assert arrays["latents"].shape == (8, 8, 8, 4)
    for f in ("tokenizer/ckpt/2", "flowar/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    (cache,) = os.listdir(tmp_path / "codes")  # the posterior moments of the train split
    assert (tmp_path / "codes" / cache / "manifest.json").exists()
    logs = [json.loads(line) for line in open(tmp_path / "flowar/tb/metrics.jsonl")]
    steps = [r for r in logs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(f"train/scale_{n}" in steps[0] for n in (1, 2, 4, 8))
