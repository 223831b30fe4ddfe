"""experiments.var_imagenet: bad input fails before compilation; a smoke run end to end on the
8 simulated devices (resume and the digits evaluation hook are the shared `arjax.stages` code,
covered by the LlamaGen experiment's smoke test)."""

import json
import os

import pytest

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
    (["sample.top_k=65"], "top_k"),
    (["var_train.batch_size=12"], "multiple of the 8"),
    (["model.vocab_size=128"], "must equal the tokenizer"),
    (["model.patch_nums=[1,2,4,8]"], "patch_nums"),
    (["tokenizer.patch_nums=[1,2,4]", "model.patch_nums=[1,2,4]"], "latent side"),
    (["var_ckpt=/nonexistent/var_d16.pth"], "does not exist"),
])
def test_bad_input_fails_before_compilation(overrides, match, no_compilation, tmp_path):
    with pytest.raises(ConfigError, match=match):
        exp.run(override(SMOKE, overrides), str(tmp_path), progress=False)


def test_digits_smoke_run(tmp_path):
    summary = exp.run(SMOKE, str(tmp_path), progress=False)
    assert summary["images"].shape == (80, 32, 32, 3)
    assert summary["sample/forward_passes"] == len(exp.DIGITS_PATCH)
    for f in ("samples.png", "samples.npz", "summary.json", "codes_train.npz",
              "var/tb/metrics.jsonl", "tokenizer/ckpt/2", "var/ckpt/2"):
        assert os.path.exists(tmp_path / f), f
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["config"]["model"]["patch_nums"] == list(exp.DIGITS_PATCH)
    logs = [json.loads(line) for line in open(tmp_path / "var/tb/metrics.jsonl")]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2]
