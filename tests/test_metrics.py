"""Metrics: FID/KID/IS/precision-recall against independent computations and closed forms, batch-size
independence, exact toy metrics, reference files, the feature classifiers, the CLI and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.stats import chi2
from sklearn.metrics.pairwise import polynomial_kernel as sk_poly

from diffdistill.errors import DiffdistillError
from diffdistill.metrics import (
    Classifier,
    ClassifierConfig,
    compute_features,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    load_classifier,
    load_feature_net,
    load_ref_stats,
    precision_recall,
    save_classifier,
    save_ref_stats,
)
from diffdistill.metrics.features import DIGITS_CLASSIFIER, ClassifierTraining, to_uint8, train_classifier
from diffdistill.metrics.fid import trace_sqrt_product
from diffdistill.metrics.protocol import reference_from_features
from diffdistill.metrics.toy import projections, sliced_wasserstein, toy_metrics
from diffdistill.teachers.analytic import GaussianMixture, ring8
from diffdistill.train.evaluate import make_train_evaluator

torch.set_num_threads(1)


def random_features(n, f, seed, shift=0.0):
    """Samples of one fixed correlated Gaussian (the mixing matrix does not depend on `seed`), shifted."""
    mix = np.random.default_rng(1234).standard_normal((f, f)) / math.sqrt(f)
    return np.random.default_rng(seed).standard_normal((n, f)) @ mix + shift


def digits_batch(n=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images[:n].astype(np.float32) / 8 - 1)[:, None], torch.from_numpy(d.target[:n])


# ------------------------------------------------------------------------------------------------ FID


def eig_frechet(mu1, s1, mu2, s2):
    """Independent formulation: tr((S1 S2)^1/2) = sum sqrt(eig(A S2 A)), A = S1^1/2 (symmetric, by eigh)."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(a @ s2 @ a)
    tr_sqrt = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_fid_of_a_set_with_itself_is_zero():
    f = random_features(300, 12, 0)
    stats = feature_stats(f)
    assert abs(fid_from_stats(stats, stats)) < 1e-8
    assert abs(fid_from_features(f, f.copy())) < 1e-8


def test_frechet_distance_matches_independent_computations():
    f1, f2 = random_features(400, 16, 1), random_features(500, 16, 2, shift=0.3)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert ours == pytest.approx(direct, rel=1e-6)
    assert ours == pytest.approx(eig_frechet(mu1, s1, mu2, s2), rel=1e-6)
    # Closed form for diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(1 + 4 + (2**2 + 1**2), rel=1e-12)
    # feature_stats: the mean and the unbiased covariance.
    mu, sigma = feature_stats(f1)
    assert np.allclose(mu, mu1) and np.allclose(sigma, ((f1 - mu1).T @ (f1 - mu1)) / (len(f1) - 1))


def test_frechet_distance_equals_sqrtm_on_2048_d_features():
    """The eigenvalue route (`trace_sqrt_product`) against scipy's sqrtm (pytorch-fid's route) on full-rank
    2048-d statistics of non-negative, correlated features (as Inception's pool features are)."""
    mix = np.random.default_rng(1234).standard_normal((2048, 2048)) / math.sqrt(2048)
    f1 = np.abs(np.random.default_rng(1).standard_normal((2100, 2048)) @ mix)
    f2 = np.abs(np.random.default_rng(2).standard_normal((2100, 2048)) @ mix) + 0.01
    (mu1, s1), (mu2, s2) = feature_stats(f1), feature_stats(f2)
    root = linalg.sqrtm(s1 @ s2)
    root = (root[0] if isinstance(root, tuple) else root).real
    by_sqrtm = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(by_sqrtm, rel=1e-10)


def test_trace_sqrt_product_of_rank_deficient_covariances():
    """Fewer samples than dimensions: tr((S1 S2)^1/2) is the nuclear norm of A B^T (S1 = A^T A, S2 = B^T B),
    computed here by an SVD of a small matrix; no NaN, no fallback."""
    f1, f2 = random_features(20, 64, 1), random_features(30, 64, 2, shift=0.5)
    a = (f1 - f1.mean(0)) / math.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / math.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    assert trace_sqrt_product(a.T @ a, b.T @ b) == pytest.approx(nuclear, rel=1e-7)
    with pytest.raises(DiffdistillError, match="NaN or inf"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, np.nan]))


def test_frechet_distance_singular_covariances_are_finite():
    f = random_features(5, 10, 3)  # 5 samples in 10-D: rank-4 covariance
    value = fid_from_features(f, f)
    assert math.isfinite(value) and abs(value) < 1e-3
    g = random_features(5, 10, 4, shift=1.0)
    expected = eig_frechet(*feature_stats(f), *feature_stats(g))
    assert fid_from_features(f, g) == pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------------------------------------------------ KID


def kid_oracle(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel via scikit-learn's kernel and masks."""
    m = len(x)
    off = ~np.eye(m, dtype=bool)
    kxx, kyy, kxy = (sk_poly(p, q, degree=3, gamma=1 / x.shape[1], coef0=1)
                     for p, q in ((x, x), (y, y), (x, y)))
    return kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()


def test_kid_matches_independent_computation_and_is_near_zero_for_identical_distributions():
    x, y = random_features(200, 8, 5), random_features(200, 8, 6)
    # One subset of all rows: a permutation of each set, which the MMD does not see.
    mean, std = kid(x, y, subsets=1, subset_size=200)
    assert mean == pytest.approx(kid_oracle(x, y), rel=1e-10) and std == 0
    same, same_std = kid(x, y, subsets=50, subset_size=100)
    shifted, _ = kid(x, random_features(200, 8, 7, shift=0.5), subsets=50, subset_size=100)
    assert abs(same) < 0.05 * shifted and abs(same) < 3 * same_std + 1e-3
    assert kid(x, y, subsets=5, subset_size=50, seed=1) == kid(x, y, subsets=5, subset_size=50, seed=1)


# ------------------------------------------------------------------------------------------------ IS


def test_inception_score_closed_forms():
    c = 10
    confident = np.eye(c)[np.arange(200) % c] * 60.0  # p(y|x) ~ one-hot, p(y) uniform -> IS = C
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6
    assert inception_score(np.zeros((50, c)), splits=1)[0] == pytest.approx(1.0)
    logits = np.random.default_rng(0).standard_normal((60, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = math.exp(np.mean([np.sum(pi * np.log(pi / p.mean(0))) for pi in p]))
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-10)


def test_inception_score_split_conventions_hand_computed():
    """Confident predictions (p(y|x) one-hot): a chunk's IS is exp(entropy of its class histogram)."""
    classes = [0, 1, 2, 3, 4, 0, 0, 1, 1, 1, 0, 1]
    logits = np.eye(5)[classes] * 60.0
    # guided-diffusion: chunks of 5 images, the last one shorter: {0..4}, {0,0,1,1,1}, {0,1}
    adm = [5.0, 1 / (0.4**0.4 * 0.6**0.6), 2.0]
    mean, std = inception_score(logits, split_size=5)
    assert mean == pytest.approx(np.mean(adm), rel=1e-12) and std == pytest.approx(np.std(adm), rel=1e-10)
    # 3 equal splits of 4: {0,1,2,3}, {4,0,0,1}, {1,1,0,1}
    equal = [4.0, 2**1.5, 4 / 3**0.75]
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(equal), rel=1e-12) and std == pytest.approx(np.std(equal), rel=1e-10)
    assert inception_score(logits, split_size=12)[0] == pytest.approx(inception_score(logits, splits=1)[0])
    with pytest.raises(DiffdistillError, match="split size"):
        inception_score(logits, split_size=0)


# ------------------------------------------------------------------------------------------------ PR


def pr_oracle(real, fake, k):
    rr = np.sort(cdist(real, real), axis=1)[:, k]
    rf = np.sort(cdist(fake, fake), axis=1)[:, k]
    precision = (cdist(fake, real) <= rr[None]).any(1).mean()
    recall = (cdist(real, fake) <= rf[None]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force_and_limits():
    real, fake = random_features(120, 6, 8), random_features(90, 6, 9, shift=0.4)
    for block in (7, 1024):
        got = precision_recall(real, fake, k=3, block=block)
        p, r = pr_oracle(real, fake, 3)
        assert got["precision"] == pytest.approx(p, abs=1e-12)
        assert got["recall"] == pytest.approx(r, abs=1e-12)
    assert precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}


# ------------------------------------------------------------------------------------------------ batch size


def test_metrics_do_not_depend_on_feature_batch_size():
    net = load_feature_net("digits")
    x, _ = digits_batch(96)
    gen = torch.Generator().manual_seed(0)
    fake = (x[:48] + 0.3 * torch.randn(x[:48].shape, generator=gen)).clamp(-1, 1)
    feats = {}
    for bs in (1, 13, 96):
        real_f, real_l = compute_features(net, (x[i:i + bs] for i in range(0, len(x), bs)))
        fake_f, _ = compute_features(net, ((fake[i:i + bs], None) for i in range(0, len(fake), bs)))
        feats[bs] = (real_f, fake_f, real_l)
    r1, f1, l1 = feats[1]
    assert r1.shape == (96, 64) and l1.shape == (96, 10)
    for bs in (13, 96):
        r, f, _ = feats[bs]
        np.testing.assert_allclose(r, r1, rtol=1e-5, atol=1e-5)
        assert fid_from_features(r, f) == pytest.approx(fid_from_features(r1, f1), rel=1e-5)
        assert kid(r, f, 10, 40)[0] == pytest.approx(kid(r1, f1, 10, 40)[0], rel=1e-5)
        assert precision_recall(r, f) == precision_recall(r1, f1)


def test_float_images_are_quantised_like_saved_pngs():
    net = load_feature_net("digits")
    x, _ = digits_batch(16)
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8(x), u8)
    assert torch.equal(to_uint8(u8.float() / 127.5 - 1), u8)  # the data loader's mapping round-trips exactly
    f_float, _ = net(x)
    f_u8, _ = net(u8)
    assert torch.equal(f_float, f_u8)


# ------------------------------------------------------------------------------------------------ classifiers


def test_shipped_digits_classifier_is_small_and_accurate():
    assert DIGITS_CLASSIFIER.stat().st_size < 200_000
    net = load_feature_net("digits")
    x, y = digits_batch(1797)
    _, logits = net(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    assert accuracy > 0.97, accuracy
    assert net.meta["holdout_accuracy"] > 0.95


def test_classifier_train_save_load_round_trip(tmp_path):
    x, y = digits_batch(120)
    cfg = ClassifierConfig(1, 8, [4], 8, 10)
    net, result = train_classifier(to_uint8(x), y, cfg, ClassifierTraining(epochs=1, batch_size=32), log=None)
    assert result["n_train"] + result["n_holdout"] == 120
    path = save_classifier(net, tmp_path / "c.safetensors", dict(note="test"))
    loaded = load_classifier(path)
    assert loaded.meta == {"note": "test"} and loaded.weights_sha256
    for a, b in zip(net(x[:8]), loaded(x[:8])):
        assert torch.equal(a, b)
    # A weight file that does not match its JSON config.
    cfg_path = path.with_suffix(".json")
    spec = json.loads(cfg_path.read_text())
    spec["config"]["widths"] = [6]
    cfg_path.write_text(json.dumps(spec))
    with pytest.raises(DiffdistillError, match=r"c\.safetensors.*(shape|match)"):
        load_classifier(path)
    cfg_path.write_text("{not json")
    with pytest.raises(DiffdistillError, match=r"c\.json"):
        load_classifier(path)


def test_bad_images_for_a_feature_network():
    net = load_feature_net("digits")
    with pytest.raises(DiffdistillError, match=r"1x8x8.*got 3x8x8"):
        net(torch.zeros(2, 3, 8, 8))
    with pytest.raises(DiffdistillError, match=r"1x8x8.*got 1x28x28"):
        net(torch.zeros(2, 1, 28, 28))
    with pytest.raises(DiffdistillError, match=r"image batches"):
        net(torch.zeros(8, 8))
    with pytest.raises(DiffdistillError, match=r"mysamples: .*1x8x8"):
        compute_features(net, [torch.zeros(1, 1, 4, 4)], source="mysamples")
    with pytest.raises(DiffdistillError, match="unknown feature network"):
        load_feature_net("resnet")
    assert isinstance(Classifier(ClassifierConfig()), Classifier)


def test_too_few_samples_say_how_many_are_needed():
    f = random_features(20, 4, 0)
    with pytest.raises(DiffdistillError, match=r"needs at least 1000 samples, got 20"):
        kid(f, f)
    with pytest.raises(DiffdistillError, match=r"k=3 needs at least 4 samples, got 3"):
        precision_recall(f[:3], f, k=3)
    with pytest.raises(DiffdistillError, match=r"10 splits needs at least 10 samples, got 5"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(DiffdistillError, match=r"needs at least 2 samples, got 1"):
        feature_stats(f[:1])


# ------------------------------------------------------------------------------------------------ ref files


def test_ref_stats_round_trip_and_bad_files(tmp_path):
    f = random_features(50, 6, 1)
    mu, sigma = feature_stats(f)
    path = save_ref_stats(tmp_path / "ref.npz", mu, sigma, features=f, meta={"n": 50})
    mu2, sigma2 = load_ref_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    from diffdistill.metrics.protocol import reference_from_file
    ref = reference_from_file(path)
    assert ref.meta == {"n": 50} and ref.features.shape == (50, 6) and len(ref.sha256) == 64
    # The pytorch-fid / EDM layout: exactly mu and sigma.
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert np.allclose(load_ref_stats(tmp_path / "edm.npz")[0], mu)
    assert reference_from_file(tmp_path / "edm.npz").features is None

    np.savez(tmp_path / "nomu.npz", m=mu, s=sigma)
    with pytest.raises(DiffdistillError, match=r"nomu\.npz.*'mu' and 'sigma'"):
        load_ref_stats(tmp_path / "nomu.npz")
    np.savez(tmp_path / "dims.npz", mu=mu, sigma=np.eye(4))
    with pytest.raises(DiffdistillError, match=r"dims\.npz.*\[F\].*\[F, F\]"):
        load_ref_stats(tmp_path / "dims.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DiffdistillError, match=r"junk\.npz.*not a readable"):
        load_ref_stats(tmp_path / "junk.npz")
    with pytest.raises(DiffdistillError, match=r"missing\.npz.*not found"):
        load_ref_stats(tmp_path / "missing.npz")
    with pytest.raises(DiffdistillError, match=r"different or bad shapes"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))


# ------------------------------------------------------------------------------------------------ toy


def test_exact_toy_metrics_on_exact_samples_give_true_values():
    gmm = ring8()
    n = 20_000
    x = gmm.sample(n, generator=torch.Generator().manual_seed(3))
    m = toy_metrics(gmm, x, seed=1)
    se = math.sqrt((1 / 8) * (7 / 8) / n)
    assert m["mode_share_max_error"] < 4.5 * se and m["modes_covered"] == 8
    p3 = chi2.cdf(9, 2)  # = 1 - exp(-4.5) in 2-D
    assert p3 == pytest.approx(1 - math.exp(-4.5)) and m["within_3std_true"] == pytest.approx(p3)
    assert abs(m["within_3std"] - p3) < 4 * math.sqrt(p3 * (1 - p3) / n)
    # Separated modes: H(p) = log 8 + (D/2) log(2 pi e s^2); the NLL's std is that of a chi^2_2 / 2 term.
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.01)
    assert abs(m["nll"] - entropy) < 4 * 1 / math.sqrt(n) and abs(m["nll_true"] - entropy) < 0.01
    assert m["sliced_w2"] < 3 * m["sliced_w2_noise_floor"] + 0.01


def test_toy_metrics_see_mode_collapse_and_shifts():
    gmm = ring8()
    x = gmm.sample(4000, generator=torch.Generator().manual_seed(0))
    kept = x[gmm.mode_of(x) < 4]  # four modes dropped
    m = toy_metrics(gmm, kept)
    assert m["modes_covered"] == 4 and m["mode_share"][4:] == [0.0] * 4
    assert sum(m["mode_share"][:4]) == pytest.approx(1.0) and m["mode_share_max_error"] >= 1 / 8
    # Sliced W2 of a translate: each 1-D projection moves by theta.v, so SW2 = sqrt(mean (theta.v)^2) exactly.
    v = np.array([0.3, -0.2])
    theta = projections(2, 64, seed=5)
    expected = math.sqrt(((theta @ v) ** 2).mean())
    xd = x.double()
    assert sliced_wasserstein(xd + torch.from_numpy(v), xd, 64, 5) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(x, x[torch.randperm(len(x))], 64, 5) == 0.0
    assert sliced_wasserstein(x, x.repeat(3, 1), 64, 5) < 1e-12  # unequal sizes, same distribution
    with pytest.raises(DiffdistillError, match="shape"):
        toy_metrics(gmm, torch.zeros(10, 3))


# ------------------------------------------------------------------------------------------------ CLI


def digit_mixture():
    """An exact 8x8 'digits' denoiser: a mixture around the ten class-mean images (std 0.05)."""
    x, y = digits_batch(500)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    return GaussianMixture(means, [0.05] * 10, [1.0] * 10, sigma_max=20.0)


class FakeMethod:
    def __init__(self, denoiser, recipe):
        self.denoiser, self.recipe = denoiser, recipe

    def export(self, ema=None):
        return self.denoiser, self.recipe


def test_train_evaluator_toy_and_images():
    ev = make_train_evaluator("toy", ref="toy:ring8", n=200)
    out = ev(FakeMethod(ring8(), {"sampler": "euler", "steps": 16}), None, 0)
    assert set(out) == {"mode_share_max_error", "modes_covered", "within_3std", "nll", "sliced_w2"}
    assert out["modes_covered"] == 8
    x, _ = digits_batch(300)
    net = load_feature_net("digits")
    ref = reference_from_features(compute_features(net, [x])[0], "digits[:300]")
    ev = make_train_evaluator("fid,is", feature_net=net, ref=ref, n=40)
    out = ev(FakeMethod(digit_mixture(), {"sampler": "euler", "steps": 6}), None, 0)
    assert set(out) == {"fid", "is"} and out["fid"] > 0 and 1 <= out["is"] <= 10


def test_evaluate_measures_the_batches_it_is_given():
    """protocol.evaluate: batches of any sizes give the numbers of the concatenated images (FID, KID, IS, PR on
    their features); `limit` measures the first images only. evaluate_toy: the exact metrics of the concatenated
    points against the mixture passed in; the protocol takes the mixture itself, never a spec it would load."""
    from diffdistill.metrics import protocol

    x, _ = digits_batch(300)
    net = load_feature_net("digits")
    ref = reference_from_features(compute_features(net, [x[:200]])[0], "digits[:200]")
    options = protocol.MetricOptions(kid_subsets=4, is_splits=3)
    gen = x[200:260]
    results, n = protocol.evaluate(iter([gen[:7], gen[7:37], gen[37:]]), ["fid", "kid", "is", "pr"], net, ref,
                                   options)
    f, logits = compute_features(net, [gen])
    assert n == 60 and list(results) == ["fid", "kid", "is", "precision", "recall"]
    assert results["fid"]["value"] == fid_from_stats(feature_stats(f), (ref.mu, ref.sigma))
    assert results["kid"]["value"] == kid(f, ref.features, 4, 60, 0)[0] and results["kid"]["subset_size"] == 60
    assert results["is"]["value"] == inception_score(logits, 3)[0]
    pr = precision_recall(ref.features, f, 3)
    assert (results["precision"]["value"], results["recall"]["value"]) == (pr["precision"], pr["recall"])
    first, n = protocol.evaluate([gen[:30], gen[30:]], ["fid"], net, ref, limit=50)
    assert n == 50 and first["fid"]["value"] == fid_from_stats(feature_stats(compute_features(net, [gen[:50]])[0]),
                                                               (ref.mu, ref.sigma))

    gmm = ring8()
    points = gmm.sample(100, generator=torch.Generator().manual_seed(3)).float()
    assert protocol.evaluate_toy([points[:40], points[40:]], gmm, seed=2) == toy_metrics(gmm, points, seed=2)
    with pytest.raises(DiffdistillError, match="GaussianMixture"):
        protocol.make_train_metrics("toy", ref="toy:ring8", n=10)
    assert protocol.make_train_metrics("toy", ref=gmm, n=10).describe()["n"] == 10


def test_cli_eval_snapshot_images_and_toy(tmp_path, capsys):
    from diffdistill.cli.main import main
    from diffdistill.io import save_snapshot

    save_snapshot(tmp_path / "run" / "model", digit_mixture(), {"sampler": "euler", "steps": 4})
    out = tmp_path / "res.json"
    rc = main(["eval", str(tmp_path / "run"), "--ref-data", "digits", "--ref-n", "200", "--metrics",
               "fid,kid,is,pr", "--n", "32", "--seed", "5", "--kid-subsets", "3", "--is-splits", "2",
               "--out", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())["records"]
    assert [r["metric"] for r in records] == ["fid", "kid", "is", "precision", "recall"]
    fid_rec = records[0]
    assert fid_rec["n"] == 32 and fid_rec["seeds"] == "5-36" and fid_rec["ref"] == "digits"
    assert fid_rec["feature_net"]["weights_sha256"] and fid_rec["time"]
    assert fid_rec["command"].startswith("diffdistill eval")
    assert records[1]["subset_size"] == 32
    assert "fid" in capsys.readouterr().out

    save_snapshot(tmp_path / "toy", ring8(), {"sampler": "euler", "steps": 8})
    assert main(["eval", str(tmp_path / "toy"), "--n", "100", "--out", str(out)]) == 1     # never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "toy"), "--n", "100", "--out", str(out), "--force"]) == 0
    toy = {r["metric"]: r for r in json.loads(out.read_text())["records"]}
    assert toy["toy/modes_covered"]["value"] == 8 and toy["toy/modes_covered"]["true_value"] == 8
    assert toy["toy/within_3std"]["true_value"] == pytest.approx(chi2.cdf(9, 2))

    # ref-stats, then eval of image data against it; a reference from another feature network is refused.
    ref = tmp_path / "digits_ref.npz"
    assert main(["ref-stats", "digits", "--n", "100", "--out", str(ref), "--save-features"]) == 0
    assert main(["eval", "digits", "--n", "50", "--ref", str(ref), "--metrics", "fid,pr"]) == 0
    np.savez(tmp_path / "other.npz", mu=np.zeros(5), sigma=np.eye(5))
    assert main(["eval", "digits", "--n", "20", "--ref", str(tmp_path / "other.npz")]) == 1
    assert "5-d features but feature network 'digits_classifier' gives 64" in capsys.readouterr().err
    np.savez(tmp_path / "bare.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert main(["eval", "digits", "--n", "20", "--ref", str(tmp_path / "bare.npz"), "--metrics", "kid"]) == 1
    assert "needs the reference features" in capsys.readouterr().err
