"""experiments.var_imagenet: bad input fails before compilation; a run end to end on the 8
simulated devices (slow; resume, re-sampling and the digits evaluation hook are the shared
`arjax.experiment` code, covered by the LlamaGen experiment's run)."""

import json
import os

import pytest
from test_experiment_llamagen import check_report

from arjax.config import ConfigError, override
from experiments import var_imagenet as exp

SMOKE = override(exp.DIGITS, [
    "tokenizer_train.steps=2", "tokenizer_train.batch_size=16", "tokenizer_train.log_every=1",
    "var_train.steps=2", "var_train.batch_size=16", "var_train.log_every=1",
    "var_train.eval_every=0", "samples_per_class=8", "eval_samples_per_class=0",
    "model.depth=2", "model.width=32", "model.heads=2",
])


@pytest.mark.parametrize("overrides,match", [
    (["sample.cfg=-1.0"], "cfg"),
    (["sample.cfg_schedule=exp"], "cfg_schedule"),
    (["sample.top_k=65"], "top_k"),
    (["var_train.batch_size=12"], "multiple of the 8"),
    (["var_train.ckpt_every=0"], "var_train.ckpt_every must be >= 1"),
    (["model.vocab_size=128"], "derived from tokenizer.codebook_size"),
    (["model.patch_nums=[1,2,4,8]"], "derived from tokenizer.patch_nums"),
    (["tokenizer.patch_nums=[1,2,4]"], "latent side"),
    (["var_ckpt=/nonexistent/var_d16.pth"], "does not exist"),
    (["data.views=random"], "data.views must be one of"),
    (["data.views=var_crops", "data.crops=0"], "data.crops must be >= 1"),
    (["data.workers=-1"], "data.workers must be >= 0"),
    (["draft_steps=6"], "draft_steps=6 must be in"),
    (["draft_steps=3", "refiner_train.steps=0"], "refiner_train.steps must be > 0"),
    (["draft_steps=3", "refiner_ckpt=/nonexistent/refiner_8.pth"], "does not exist"),
    (["sample.temperature=[1.0,1.0]"], "give one per scale"),
])
def test_bad_input_fails_before_compilation(overrides, match, no_compilation, tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(override(SMOKE, overrides), str(tmp_path), progress=False)


@pytest.mark.slow
def test_digits_run(tmp_path):
    summary = exp.run(SMOKE, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    patch = exp.DIGITS.tokenizer.patch_nums
    assert summary["sample/target_passes"] == len(patch)  # counted in the sampler
    assert 0 < summary["tokenizer/final_mse"] < 4 and summary["var/final_loss"] > 0
    saved, arrays = check_report(tmp_path / "samples" / "step2", summary, 8, range(10))
    assert arrays["codes"].shape == (80, sum(p * p for p in patch))
    assert saved["config"]["model"]["patch_nums"] == list(patch)
    for f in ("tokenizer/ckpt/2", "var/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    (cache,) = os.listdir(tmp_path / "codes")  # one complete cache of the train split
    assert cache.startswith("train-") and (tmp_path / "codes" / cache / "manifest.json").exists()
    logs = [json.loads(line) for line in open(tmp_path / "var/tb/metrics.jsonl")]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2]


@pytest.mark.slow
def test_collaborative_decoding_with_a_trained_refiner(tmp_path):
    """CoDe on digits: the refiner trains as its own stage on its scales, then the model
    drafts 3 scales and the refiner finishes the other 3 inside one sampler. The data follow
    VAR's recipe (2 stored random crops per image) loaded by a grain worker process."""
    cfg = override(SMOKE, ["draft_steps=3", "refiner_train.steps=2",
                           "refiner_train.batch_size=16", "refiner_train.log_every=1",
                           "refiner.depth=1", "refiner.width=16", "data.views=var_crops",
                           "data.crops=2", "data.workers=1"])
    summary = exp.run(cfg, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    (cache,) = os.listdir(tmp_path / "codes")
    manifest = json.load(open(tmp_path / "codes" / cache / "manifest.json"))
    assert manifest["views"] == 2 and manifest["num_examples"] == 1500
    assert (summary["sample/drafter_passes"], summary["sample/refiner_passes"]) == (3, 3)
    assert summary["refiner/params"] < summary["var/params"]
    assert os.path.exists(tmp_path / "refiner" / "ckpt" / "2")
