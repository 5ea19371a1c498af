"""The evaluation protocol around the metric math: a reference made with another feature network is refused
(its recorded identity: weights sha256, resize, normalisation), the field's npz layouts (guided-diffusion
sample/reference batches) give the same numbers as the same images in diffdistill's layout, data sets are
subsampled with EDM's seeded rule, and `features train` warns about a poor classifier. Feature networks: the
shipped digits classifier, random classifiers, and a random Inception-v3 saved in the standard layout (no real
weights here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdistill.metrics import inception as inc
from diffdistill.metrics.features import (
    POOR_ACCURACY,
    Classifier,
    ClassifierConfig,
    accuracy_warning,
    compute_features,
    dataset_batches,
    load_feature_net,
    save_classifier,
    sha256_file,
    subset_indices,
    to_uint8,
)
from diffdistill.metrics.fid import feature_stats, fid_from_stats, load_ref_extras
from diffdistill.metrics.kid import kid
from diffdistill.metrics.precision_recall import precision_recall
from tests.cli_util import one_error_line, run_cli

torch.set_num_threads(1)




def records(path) -> dict:
    return {r["metric"]: r for r in json.loads(path.read_text())["records"]}


def digits_uint8(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n `digits` images as uint8 NHWC [n, 8, 8, 1] (as diffdistill's data set reads them), labels."""
    from diffdistill.data import open_dataset

    ds = open_dataset("digits")
    x = torch.stack([to_uint8(torch.as_tensor(ds[i][0])) for i in range(n)])
    return x.permute(0, 2, 3, 1).numpy(), ds.labels[:n]


def fid_closed_form(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets without a matrix square root: with S1 = A^T A, S2 = B^T B (A, B the centred
    features / sqrt(n - 1)), tr((S1 S2)^(1/2)) is the sum of the singular values of A B^T."""
    a = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * nuclear)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_NAME
    torch.save(inc.InceptionV3().state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------ identity


def test_a_reference_from_another_classifier_is_refused(tmp_path, capsys):
    ref = tmp_path / "digits_ref.npz"
    code, _, err = run_cli(capsys, "ref-stats", "digits", "--n", 200, "--out", ref, "--no-progress")
    assert code == 0, err
    _, meta = load_ref_extras(ref)
    made = meta["feature_net"]
    assert made["name"] == "digits_classifier" and made["normalisation"] == "x/127.5-1" and len(
        made["weights_sha256"]) == 64 and "resize" in made and made["feature_dim"] == 64

    # Another 64-d network: before, FID came out (a large number) with exit 0.
    torch.manual_seed(1)
    other = save_classifier(Classifier(ClassifierConfig(1, 8, [16, 32], 64, 10)), tmp_path / "other.safetensors")
    code, out, err = run_cli(capsys, "eval", "digits", "--n", 50, "--ref", ref, "--features", other,
                             "--no-progress")
    line = one_error_line(err)
    assert code == 1 and "digits_ref.npz" in line and "another feature network" in line
    assert "weights_sha256" in line and "ref-stats" in line and "fid" not in out

    # pytorch-fid/EDM statistics record nothing: accepted, with a warning that they cannot be checked.
    feats, _ = compute_features(load_feature_net("digits"), dataset_batches(load_digits(), 256, 200))
    mu, sigma = feature_stats(feats)
    np.savez(tmp_path / "bare.npz", mu=mu, sigma=sigma)
    code, out, err = run_cli(capsys, "eval", "digits", "--n", 50, "--ref", tmp_path / "bare.npz", "--no-progress")
    assert code == 0 and "WARNING" in err and "cannot be checked" in err, err
    # A record of an older version (no resize/normalisation) with the same weights: accepted, no warning.
    old = {k: made[k] for k in ("name", "feature_dim", "weights_sha256")}
    np.savez(tmp_path / "old.npz", mu=mu, sigma=sigma, meta=np.array(json.dumps(dict(feature_net=old))))
    code, out, err = run_cli(capsys, "eval", "digits", "--n", 50, "--ref", tmp_path / "old.npz", "--no-progress")
    assert code == 0 and "WARNING" not in err, err


def load_digits():
    from diffdistill.data import open_dataset

    return open_dataset("digits")


def test_inception_reference_with_another_resize_is_refused(tmp_path, capsys, inception_weights):
    ref = tmp_path / "ptfid.npz"
    code, out, err = run_cli(capsys, "ref-stats", "digits", "--n", 3, "--out", ref, "--features", "inception",
                             "--inception", inception_weights, "--resize", "pytorch-fid", "--no-progress")
    assert code == 0, err
    assert "NOT the standard FID file" in err and "NON-STANDARD weights" in out  # random weights: said loudly
    code, _, err = run_cli(capsys, "eval", "digits", "--n", 3, "--ref", ref, "--features", "inception",
                           "--inception", inception_weights, "--no-progress")
    line = one_error_line(err)
    assert code == 1 and "resize pytorch-fid" in line and "resize tf1" in line and "normalisation" in line


# ------------------------------------------------------------------------------------------ npz layouts


def test_guided_diffusion_batches_give_the_numbers_of_the_same_images(tmp_path, capsys):
    images, labels = digits_uint8(260)
    samples, refs = images[:60], images[60:]
    np.savez(tmp_path / "adm_samples.npz", arr_0=samples)                  # ADM sample batch
    np.savez(tmp_path / "adm_ref.npz", arr_0=refs, arr_1=labels[60:])      # images only: a --ref-data
    np.savez(tmp_path / "dd_samples.npz", x=samples)                       # diffdistill's npz layout (NHWC)
    np.savez(tmp_path / "dd_ref.npz", x=refs)
    common = ("--features", "digits", "--metrics", "fid,kid,is,pr", "--kid-subsets", 4, "--is-splits", 3,
              "--no-progress")
    results = []
    for s, r in (("adm_samples", "adm_ref"), ("dd_samples", "dd_ref")):
        code, out, err = run_cli(capsys, "eval", tmp_path / f"{s}.npz", "--ref-data", tmp_path / f"{r}.npz",
                                 "--out", tmp_path / f"{s}.json", *common)
        assert code == 0, err
        results.append(records(tmp_path / f"{s}.json"))
    adm, dd = results
    assert set(adm) == {"fid", "kid", "is", "precision", "recall"}
    for name in adm:
        assert adm[name]["value"] == dd[name]["value"] and adm[name]["n"] == 60, name
    assert adm["fid"]["layout"] == "adm-samples" and adm["fid"]["ref_layout"] == "adm-samples"
    assert adm["fid"]["value"] > 0 and adm["fid"]["items"] == "0-59"
    # An image batch is not a statistics file: --ref says to pass it as --ref-data.
    code, _, err = run_cli(capsys, "eval", tmp_path / "dd_samples.npz", "--ref", tmp_path / "adm_ref.npz",
                           *common)
    assert code == 1 and "--ref-data" in one_error_line(err)
    np.savez(tmp_path / "bad.npz", arr_0=samples.astype(np.float32))
    code, _, err = run_cli(capsys, "eval", tmp_path / "bad.npz", "--ref-data", "digits", *common)
    assert code == 1 and "bad.npz" in one_error_line(err) and "uint8" in err


def test_guided_diffusion_reference_batch_statistics(tmp_path, capsys, monkeypatch, inception_weights):
    """A reference batch's mu/sigma are ADM's Inception statistics: used with the standard weights and the TF1
    resize (here: the random file made standard for the test), refused with another resize; its arr_0 images
    give the reference features of KID and precision/recall."""
    monkeypatch.setattr(inc, "WEIGHTS_SHA256", sha256_file(inception_weights))
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    net = inc.load_inception(inception_weights)
    feats, _ = compute_features(net, [torch.from_numpy(np.concatenate([refs, samples])).permute(0, 3, 1, 2)])
    ref_feats, sample_feats = feats[:3], feats[3:]
    mu, sigma = feature_stats(ref_feats)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=refs, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    common = ("--features", "inception", "--inception", inception_weights, "--metrics", "fid,kid,pr",
              "--kid-subsets", 2, "--pr-k", 1, "--no-progress")
    code, out, err = run_cli(capsys, "eval", tmp_path / "samples.npz", "--ref", tmp_path / "VIRTUAL_ref.npz",
                             "--out", tmp_path / "adm.json", *common)
    assert code == 0 and "WARNING" not in err, err
    assert "fid-2 [Inception-v3 FID weights, tf1 resize]" in out
    rec = records(tmp_path / "adm.json")
    assert rec["fid"]["value"] == pytest.approx(fid_closed_form(sample_feats, ref_feats), rel=1e-7)
    assert rec["kid"]["value"] == pytest.approx(kid(sample_feats, ref_feats, 2, 2, 0)[0], rel=1e-9, abs=1e-12)
    pr = precision_recall(ref_feats, sample_feats, 1)
    assert rec["precision"]["value"] == pr["precision"] and rec["recall"]["value"] == pr["recall"]
    assert rec["fid"]["ref_layout"] == "adm-reference" and rec["fid"]["ref_feature_net"]["resize"] == "tf1"
    code, _, err = run_cli(capsys, "eval", tmp_path / "samples.npz", "--ref", tmp_path / "VIRTUAL_ref.npz",
                           "--resize", "pytorch-fid", *common)
    assert code == 1 and "resize tf1" in one_error_line(err)


# ------------------------------------------------------------------------------------------ subsets


def test_data_sets_take_a_seeded_random_subset_as_edm(tmp_path, capsys):
    from diffdistill.data import open_dataset

    # EDM's rule, as ImageDataset's max_size implements it with seed 0
    assert np.array_equal(subset_indices(1797, 100, 0), open_dataset("digits", max_size=100)._raw)
    assert not np.array_equal(subset_indices(1797, 100, 1), subset_indices(1797, 100, 0))
    assert np.array_equal(subset_indices(50, 80, 3), np.arange(50))

    ref = tmp_path / "ref.npz"
    code, out, err = run_cli(capsys, "ref-stats", "digits", "--n", 300, "--seed", 7, "--out", ref,
                             "--save-features", "--no-progress")
    assert code == 0, err
    _, meta = load_ref_extras(ref)
    assert meta["subset_seed"] == 7 and meta["items"] == "random 300 of 1797 (seed 7)"
    ds, net = open_dataset("digits"), load_feature_net("digits")
    ref_feats, _ = compute_features(net, dataset_batches(ds, 64, indices=subset_indices(1797, 300, 7)))
    with np.load(ref) as f:
        assert np.allclose(f["mu"], ref_feats.mean(0), rtol=0, atol=1e-12)

    code, out, err = run_cli(capsys, "eval", "digits", "--n", 50, "--seed", 3, "--ref", ref, "--out",
                             tmp_path / "r.json", "--metrics", "fid,kid", "--kid-seed", 5, "--no-progress")
    assert code == 0, err
    rec = records(tmp_path / "r.json")
    assert rec["fid"]["subset_seed"] == 3 and rec["fid"]["items"] == "random 50 of 1797 (seed 3)"
    assert rec["kid"]["kid_seed"] == 5 and rec["fid"]["ref_subset_seed"] == 7
    feats, _ = compute_features(net, dataset_batches(ds, 64, indices=subset_indices(1797, 50, 3)))
    assert rec["fid"]["value"] == pytest.approx(fid_from_stats(feature_stats(feats), feature_stats(ref_feats)),
                                                rel=1e-9)


# ------------------------------------------------------------------------------------------ classifiers


def test_features_train_warns_about_a_poor_classifier(tmp_path, capsys):
    assert accuracy_warning(dict(holdout_accuracy=0.95)) is None
    assert f"below {POOR_ACCURACY:.2f}" in accuracy_warning(dict(holdout_accuracy=0.5))
    assert "unmeasured" in accuracy_warning(dict(holdout_accuracy=float("nan")))
    code, out, err = run_cli(capsys, "features", "train", "--data", "digits", "--out", tmp_path / "c.safetensors",
                             "--epochs", 1, "--max-n", 100, "--holdout", 0.5, "--batch-size", 50)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["holdout_accuracy"] < POOR_ACCURACY and "below 0.90" in result["warning"]
    assert "WARNING" in err and "poor feature network" in err
    meta = json.loads((tmp_path / "c.json").read_text())["meta"]
    assert meta["warning"] == result["warning"]
