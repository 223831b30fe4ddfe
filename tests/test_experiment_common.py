"""The shared experiment machinery: typed overrides, derived fields, the CLI's one-line
errors, the work-dir lock, fingerprinted code caches and never-overwritten reports."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax import sharding
from arjax.config import ConfigError, override
from arjax.data.sources import ArraySource
from arjax.experiment import outputs
from arjax.experiment.cli import workdir_lock
from arjax.experiment.pipeline import StageConfig, cached_codes, fingerprint
from experiments import flowar_imagenet, llamagen_imagenet, mar_imagenet, var_imagenet

EXPERIMENTS = [llamagen_imagenet, var_imagenet, flowar_imagenet, mar_imagenet]


@pytest.mark.parametrize("assignment,match", [
    ("gpt_train.steps=abc", "gpt_train.steps='abc': expected int, got str"),
    ("gpt_train.steps=2.5", "gpt_train.steps='2.5': expected int, got float"),
    ("sample.top_p=high", "sample.top_p='high': expected float"),
    ("sample_classes=3", "sample_classes='3': expected tuple"),
    ("tokenizer_ckpt=[1]", None),  # a str field takes the text as it is
    ("speculative.draft_len=True", "expected int, got bool"),
])
def test_overrides_are_type_checked_against_the_field(assignment, match):
    if match is None:
        assert override(llamagen_imagenet.DIGITS, [assignment]).tokenizer_ckpt == "[1]"
        return
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        override(llamagen_imagenet.DIGITS, [assignment])


def test_linked_fields_are_derived_once():
    cfg = override(var_imagenet.DIGITS, ["tokenizer.codebook_size=32",
                                         "tokenizer.patch_nums=[1,2,4,8]"])
    assert cfg.model.vocab_size == 32 and cfg.model.patch_nums == (1, 2, 4, 8)
    gpt = override(llamagen_imagenet.DIGITS, ["tokenizer.codebook_size=32", "model.grid=4"])
    assert gpt.model.vocab_size == gpt.draft_model.vocab_size == 32
    assert gpt.draft_model.grid == 4
    assert flowar_imagenet.DIGITS.model.token_dim == flowar_imagenet.DIGITS.tokenizer.embed_dim
    with pytest.raises(ConfigError, match="derived from tokenizer.codebook_size"):
        override(var_imagenet.DIGITS, ["model.vocab_size=128"])


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize("argv,match", [
    (["--config", "nope"], "unknown --config 'nope'"),
    (["--config", "digits", "--set", "seed=abc"], "seed='abc': expected int"),
    (["--config", "digits", "--set", "tokenizer_train.log_every=0"], "log_every must be >= 1"),
    (["--config", "digits", "--set", "tokenizer_train.ckpt_every=0"], "ckpt_every must be"),
    (["--config", "digits", "--workdir", "{file}"], "is a file"),
])
def test_cli_prints_one_line_for_expected_errors(exp, argv, match, tmp_path, capsys,
                                                  no_compilation):
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    if "--workdir" not in argv:
        argv += ["--workdir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        exp.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(var_imagenet, "build", broken)
    with pytest.raises(ZeroDivisionError):
        var_imagenet.main(["--config", "digits", "--workdir", str(tmp_path)])


def test_help_example_is_accepted():
    from arjax import config as cfglib

    cfg, _ = cfglib.from_argv(var_imagenet.PRESETS, ["--config", "digits", "--set", "seed=1"])
    assert cfg.seed == 1


def test_stage_config_bounds():
    for bad, match in ((dict(log_every=0), "log_every"), (dict(ckpt_every=0), "ckpt_every"),
                       (dict(batch_size=0), "batch_size"), (dict(steps=-1), "steps"),
                       (dict(eval_every=-1), "eval_every")):
        with pytest.raises(ConfigError, match=match):
            StageConfig(**bad).validate("gpt_train")


def test_second_run_on_a_work_dir_is_refused(tmp_path):
    with workdir_lock(str(tmp_path)):
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with workdir_lock(str(tmp_path)):
                pass
    with workdir_lock(str(tmp_path)):  # released
        pass


def test_code_cache_is_named_by_its_producer(tmp_path, capsys):
    source = ArraySource(np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3),
                         np.arange(10) % 3, 3)
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    calls = []

    def encoder(offset):
        def encode(images):
            calls.append(images.shape[0])
            return images[:, 0, 0, :1].astype(jnp.int32) + offset
        return encode

    params = {"w": np.ones(3, np.float32)}
    first = fingerprint(params, tokenizer={"steps": 40})
    a = cached_codes(encoder(0), source, str(tmp_path), "train", first, 4, mesh,
                     progress=False)
    assert os.listdir(tmp_path / "codes") == [f"train-{first}"]
    b = cached_codes(encoder(0), source, str(tmp_path), "train", first, 4, mesh,
                     progress=False)  # complete: read, not extracted again
    codes = a[np.arange(10)]["codes"]
    assert len(calls) == 1 and np.array_equal(codes, b[np.arange(10)]["codes"])
    assert np.array_equal(codes[:, 0], source.images[:, 0, 0, 0])
    trained_on = fingerprint({"w": np.ones(3, np.float32) * 1.01}, tokenizer={"steps": 40})
    assert trained_on != first and fingerprint(params, tokenizer={"steps": 50}) != first
    c = cached_codes(encoder(1), source, str(tmp_path), "train", trained_on, 4, mesh,
                     progress=False)  # the tokenizer trained on: a new cache, the old removed
    assert os.listdir(tmp_path / "codes") == [f"train-{trained_on}"]
    assert np.array_equal(c[np.arange(10)]["codes"], codes + 1)
    assert "superseded" in capsys.readouterr().out


def test_reports_never_overwrite_each_other(tmp_path):
    first = outputs.report_dir(str(tmp_path), "step3")
    second = outputs.report_dir(str(tmp_path), "step3")
    assert first.endswith("samples/step3") and second.endswith("samples/step3-2")


def test_json_outputs_are_strict(tmp_path):
    outputs.write_json(str(tmp_path / "s.json"), {"fid": float("nan"), "n": np.int64(3),
                                                  "x": [float("inf"), 1.5]})
    text = open(tmp_path / "s.json").read()
    assert json.loads(text) == {"fid": None, "n": 3, "x": [None, 1.5]} and "NaN" not in text


def test_help_does_not_import_torch():
    import subprocess

    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "try: runpy.run_module('experiments.var_imagenet', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'tensorboardX' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--tag" in out.stdout


def test_fid_samples_cover_every_class_in_chunks(tmp_path):
    """7 classes x 3 in chunks of 4: every image once, in class order, the last chunk filled
    up with repeated labels and one batch shape; the .npz is what arjax.evaluate reads."""
    from arjax.evaluate import load_images
    from arjax.sampling.generator import Generated

    calls = []

    def generate(params, labels, key):  # images encode their label and the chunk's key
        calls.append(labels.copy())
        images = np.zeros((len(labels), 4, 4, 3), np.uint8)
        images[..., 0] = labels[:, None, None]
        images[..., 1] = jax.random.randint(key, (), 0, 255)
        return Generated(images, {}, {"seconds": 0.5})

    path = str(tmp_path / "fid_samples.npz")
    out = outputs.fid_samples(generate, None, path, 7, 3, 4, seed=0, progress=False)
    assert out["fid/images"] == 21 and out["fid/seconds"] == 0.5 * 6
    assert [len(c) for c in calls] == [4] * 6 and list(calls[-1]) == [6, 6, 6, 6]
    images, labels = load_images(path)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(7), 3))
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    assert len(set(images[::4, 0, 0, 1])) > 1  # each chunk has its own key
    assert not os.path.exists(path + ".partial.npy")
