"""FID / IS / precision-recall as ADM computes them, and the digits evaluator."""

import json

import numpy as np
import pytest
from scipy import linalg

from arjax import evaluate
from arjax.data.sources import digits
from arjax.metrics.digits import DigitsEvaluator
from arjax.metrics.fid import FeatureStats, frechet_distance
from arjax.metrics.inception_score import inception_score
from arjax.metrics.precision_recall import manifold_radii, precision_recall


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    s = FeatureStats.of(x)
    assert abs(frechet_distance(s, s)) < 1e-6


def test_fid_matches_gaussian_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    s1 = FeatureStats(rng.normal(size=8), a @ a.T + np.eye(8))
    b = rng.normal(size=(8, 8))
    s2 = FeatureStats(rng.normal(size=8), b @ b.T + 0.5 * np.eye(8))
    r1 = linalg.sqrtm(s1.sigma)
    closed = (np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma + s2.sigma)
              - 2 * np.trace(linalg.sqrtm(r1 @ s2.sigma @ r1).real))
    assert frechet_distance(s1, s2) == pytest.approx(closed, rel=1e-8)
    # Diagonal case by hand: sum (sqrt(a) - sqrt(b))^2.
    d1, d2 = FeatureStats(np.zeros(3), np.diag([1.0, 4, 9])), FeatureStats(np.ones(3),
                                                                            np.diag([4.0, 4, 1]))
    assert frechet_distance(d1, d2) == pytest.approx(3 + 1 + 0 + 4)


def test_inception_score_extremes():
    uniform = np.full((1000, 10), 0.1)
    assert inception_score(uniform) == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(1000) % 10] * (1 - 1e-12) + 1e-13
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-6)
    # Splits of 5,000 as ADM: two halves each collapsed onto one class -> IS 1.
    halves = np.concatenate([np.tile(np.eye(10)[0] * 0.99 + 0.001, (5000, 1)),
                             np.tile(np.eye(10)[1] * 0.99 + 0.001, (5000, 1))])
    assert inception_score(halves) == pytest.approx(1.0)


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 2))
    inside = rng.normal(size=(400, 2)) * 0.3  # concentrated in the reference mode
    p, r = precision_recall(ref, inside)
    assert p > 0.95 and r < 0.6
    far = rng.normal(size=(400, 2)) + 50
    assert precision_recall(ref, far) == (0.0, 0.0)
    assert precision_recall(ref, ref) == (1.0, 1.0)


def test_manifold_radius_counts_self_as_neighbour_zero():
    pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distances from 0: 0, 1, 9, 36, 100 -> 3rd neighbour (k=3) is 36.
    assert manifold_radii(pts, k=3)[0] == pytest.approx(36.0)


@pytest.fixture(scope="session")
def digits_evaluator():
    return DigitsEvaluator.load()  # cached in $ARJAX_CACHE (set by conftest)


@pytest.mark.slow  # trains the digits evaluator (~2 min) unless cached: make test-all
def test_digits_evaluator_separates_real_digits_from_noise(digits_evaluator, tmp_path):
    test = digits("test", 32)
    real = evaluate.evaluate_digits(test.images, test.labels, evaluator=digits_evaluator)
    noise_imgs = np.random.default_rng(0).integers(0, 256, test.images.shape).astype(np.uint8)
    noise = evaluate.evaluate_digits(noise_imgs, test.labels, evaluator=digits_evaluator)
    assert real["class_accuracy"] > 0.95 and noise["class_accuracy"] < 0.3
    assert real["fid_digits"] * 20 < noise["fid_digits"]
    assert real["is_digits"] > 8 and noise["is_digits"] < 3
    assert real["precision"] > 0.7 and noise["precision"] < 0.05


@pytest.mark.slow  # needs the digits evaluator: make test-all
def test_evaluate_cli_writes_json(digits_evaluator, tmp_path, monkeypatch):
    monkeypatch.setattr(DigitsEvaluator, "load", classmethod(lambda cls: digits_evaluator))
    test = digits("test", 32)
    np.savez(tmp_path / "s.npz", images=test.images[:100], labels=test.labels[:100])
    evaluate.main(["--samples", str(tmp_path / "s.npz"), "--reference", "digits:train"])
    out = json.load(open(tmp_path / "s.eval.json"))
    assert out["num_samples"] == 100 and out["class_accuracy"] > 0.9
    assert "NaN" not in open(tmp_path / "s.eval.json").read()
    with pytest.raises(evaluate.InputError, match="neither"):
        evaluate.main(["--samples", str(tmp_path / "missing.npz")])


@pytest.mark.parametrize("images,match", [
    (lambda x: x.astype(np.float32) / 255, "float32; uint8"),
    (lambda x: x.astype(np.float32) * 0 + np.nan, "contain NaN"),
    (lambda x: x.transpose(0, 3, 1, 2), "channels first"),
    (lambda x: x[:1], "at least 4"),
    (lambda x: np.repeat(np.repeat(x, 2, 1), 2, 2), "64x64 but the reference is 32x32"),
    (lambda x: np.array([object()] * 8, dtype=object), "Python objects"),
])
def test_evaluate_refuses_bad_samples_before_any_network(images, match, tmp_path, monkeypatch,
                                                         capsys):
    from arjax import evaluate
    from arjax.data.sources import digits

    monkeypatch.setattr(evaluate, "evaluate_digits", lambda *a: pytest.fail("scored garbage"))
    np.savez(tmp_path / "s.npz", images=images(digits("test", 32).images[:8]))
    with pytest.raises(SystemExit) as exit_:
        evaluate.cli(["--samples", str(tmp_path / "s.npz")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_converts_greyscale():
    from arjax import evaluate
    from arjax.data.sources import digits

    grey = digits("test", 32).images[:5, :, :, 0]
    rgb = evaluate.check_images(grey, "samples")
    assert rgb.shape == (5, 32, 32, 3) and np.all(rgb[..., 2] == grey)
