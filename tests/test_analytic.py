"""Analytic teachers: specs, exact samples and log-density, and every bad input of issue 2."""

import json
import math

import pytest
import torch

from diffdistill.errors import DiffdistillError
from diffdistill.io import build_denoiser
from diffdistill.teachers.analytic import Gaussian, GaussianMixture, load_analytic


def test_ring8_spec():
    r = load_analytic("toy:ring8")
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    assert torch.allclose(r.means, torch.stack([ang.cos(), ang.sin()], 1))
    assert torch.allclose(r.stds, torch.full((8,), 0.1, dtype=torch.float64))
    assert torch.allclose(r.weights, torch.full((8,), 1 / 8, dtype=torch.float64))


def test_gmm_json_spec_normalises_weights_and_round_trips(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"means": [[0, 0, 1], [2, 2, 2]], "stds": [0.5, 1.0], "weights": [1, 3]}))
    g = load_analytic(f"gmm:{p}")
    assert g.shape == (3,) and torch.allclose(g.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    again = build_denoiser(g.config())
    x = torch.randn(4, 3)
    assert torch.equal(again(x, 0.7), g(x, 0.7))


def test_exact_samples_and_log_density():
    g = Gaussian([0.3, -0.2], 0.5)
    x = g.sample(50_000, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(x.mean(0), torch.tensor([0.3, -0.2], dtype=torch.float64), atol=0.01)
    assert torch.allclose(x.std(0), torch.full((2,), 0.5, dtype=torch.float64), rtol=0.02)
    pt = torch.tensor([[0.3, -0.2]])
    assert g.log_prob(pt).item() == pytest.approx(-math.log(2 * math.pi * 0.25), abs=1e-12)
    # Image-shaped mixtures work too, and the log-density is stable far from every mode (log-sum-exp).
    img = GaussianMixture(torch.zeros(2, 1, 4, 4), [0.1, 0.2], [0.5, 0.5])
    far = torch.full((1, 1, 4, 4), 1e3)
    assert torch.isfinite(img.log_prob(far)).all() and torch.isfinite(img(far, 0.01)).all()
    assert img.sample(3).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("cfg,match", [
    ({"means": [[0.0]], "stds": [-1.0], "weights": [1.0]}, r"field stds\[0\]: expected a finite number > 0"),
    ({"means": [[0.0], [1.0]], "stds": [1.0, 1.0], "weights": [0.0, 0.0]}, "positive sum"),
    ({"means": [[0.0], [1.0]], "stds": [1.0], "weights": [1.0, 1.0]}, "field stds: expected 2 numbers"),
    ({"means": [[0.0], [1.0, 2.0]], "stds": [1.0, 1.0], "weights": [1.0, 1.0]}, r"field means\[1\]"),
    ({"means": [[0.0]], "stds": [1.0]}, "field weights: .*required"),
])
def test_bad_gmm_specs(tmp_path, cfg, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(DiffdistillError, match=match) as e:
        load_analytic(f"gmm:{p}")
    assert str(p) in str(e.value)


def test_bad_specs(tmp_path):
    with pytest.raises(DiffdistillError, match="toy:ring9.*toy:ring8"):
        load_analytic("toy:ring9")
    with pytest.raises(DiffdistillError, match="not found"):
        load_analytic(f"gmm:{tmp_path / 'missing.json'}")
    (tmp_path / "broken.json").write_text("{means: ")
    with pytest.raises(DiffdistillError, match="malformed gmm spec"):
        load_analytic(f"gmm:{tmp_path / 'broken.json'}")
