"""Pairs of (noise, teacher sample) for knowledge distillation: their storage (diffdistill.data.pairs) and
generation (diffdistill.methods.kd_pairs); algorithms.md §2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdistill.data import pairs as P
from diffdistill.diffusion.denoiser import Denoiser, Precond, PrecondConfig
from diffdistill.diffusion.schedules import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod
from diffdistill.errors import DiffdistillError
from diffdistill.methods import kd_pairs as KP
from diffdistill.samplers import get_sampler
from diffdistill.teachers.analytic import Gaussian, GaussianMixture, ring8

SMALL = dict(n_pairs=500, heldout=100, shard_size=200, sampler="euler", steps=4, batch=64, seed=3)
AS_BEFORE = dict(n_pairs=None, heldout=None, shard_size=None, sampler=None, steps=None, target_dtype=None, seed=None)


def ddpm_gaussian(mu=0.0, std=1.0) -> GaussianMixture:
    """An exact 1-D Gaussian teacher that knows DDPM's 1000 linear-beta levels (a discrete-time teacher)."""
    t = Gaussian([mu], std)
    t.discrete_sigmas = sigmas_from_alphas_cumprod(ddpm_alphas_cumprod())
    return t


def vp_ddim_gaussian(seq, mu, var, z_T=1.0):
    """Independent oracle: Denoising Student's DDIM in VP form (abar form of §1.5) with the exact posterior
    mean of N(mu, var) data; x_T = z_T at index seq[-1], abar_{-1} = 1. Returns x_0 (numpy float64)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    seq = list(seq)
    nxt = [-1] + seq[:-1]
    z = z_T
    for i, j in zip(reversed(seq), reversed(nxt)):
        a, ap = abar[i], (abar[j] if j >= 0 else 1.0)
        alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
        x_hat = mu + alpha * var / (alpha**2 * var + sigma**2) * (z - alpha * mu)
        eps = (z - alpha * x_hat) / sigma
        z = np.sqrt(ap) * x_hat + np.sqrt(1 - ap) * eps
    return z


def same_shard(a, b) -> bool:
    """Equal tensors and metadata (the safetensors header's key order is not fixed)."""
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        return fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys()) and \
            all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def run_recipe(teacher, recipe, z):
    fn = get_sampler(recipe["sampler"])
    return fn(teacher, z * recipe["prior_scale"], torch.tensor(recipe["sigmas"], dtype=torch.float64))


def test_ddpm_schedules_match_oracle_o11():
    # O11: the quadratic 100-step schedule from index 800 maps N(0,1) noise to 0.985765 x_T.
    t = ddpm_gaussian()
    recipe = KP.teacher_recipe(t, KP.PairsConfig())
    assert recipe["name"] == "ddim-quad" and len(recipe["sigmas"]) == 96 + 1  # 96 unique indices, then 0
    z = torch.ones(1, 1, dtype=torch.float64)
    assert float(run_recipe(t, recipe, z)) == pytest.approx(0.985765, abs=1e-6)
    seq = (np.linspace(0, np.sqrt(800), 100) ** 2).astype(int)
    assert float(run_recipe(t, recipe, z)) == pytest.approx(vp_ddim_gaussian(seq, 0.0, 1.0), abs=1e-12)
    # Non-centred data and the 50-step uniform schedule against the VP-form oracle.
    t2 = ddpm_gaussian(0.3, 0.5)
    for name, indices in (("ddim-quad", seq), ("ddim-uniform", range(0, 1000, 20))):
        r = KP.teacher_recipe(t2, KP.PairsConfig(sampler=name))
        for z0 in (-1.3, 0.4, 2.0):
            got = float(run_recipe(t2, r, torch.full((1, 1), z0, dtype=torch.float64)))
            assert got == pytest.approx(vp_ddim_gaussian(indices, 0.3, 0.25, z0), abs=1e-10)
    # Continuous teachers default to Heun, 18 steps (35 NFE), from sigma_max * z.
    r = KP.teacher_recipe(ring8(), KP.PairsConfig())
    assert r["name"] == "heun" and len(r["sigmas"]) == 19 and r["prior_scale"] == 1.0
    with pytest.raises(DiffdistillError, match="discrete-time"):
        KP.teacher_recipe(ring8(), KP.PairsConfig(sampler="ddim-quad"))


def test_pairs_are_the_teachers_samples_and_deterministic(tmp_path):
    teacher = ring8()
    m = KP.generate_pairs(teacher, tmp_path / "a", KP.PairsConfig(**SMALL), progress=False)
    assert [s["count"] for s in m["shards"]] == [200, 200, 100, 100]
    assert m["shards"][-1]["name"] == P.HELDOUT and m["target_dtype"] == "float16"
    data = P.load_shard(tmp_path / "a", m, "train-00001")
    assert data["noise"].dtype == torch.float16 and data["target"].dtype == torch.float16
    # The target is the teacher's Euler sample from exactly the stored noise.
    z = data["noise"][:50].double()
    y = run_recipe(teacher, m["recipe"], z)
    torch.testing.assert_close(data["target"][:50].double(), y.half().double(), atol=2e-3, rtol=0)
    # Same settings, same pairs.
    KP.generate_pairs(teacher, tmp_path / "b", KP.PairsConfig(**SMALL), progress=False)
    for s in m["shards"]:
        assert same_shard(P.shard_path(tmp_path / "a", s["name"]), P.shard_path(tmp_path / "b", s["name"]))


def test_ranks_write_disjoint_shards(tmp_path):
    teacher = ring8()
    calls = []
    orig = KP.generate_shard

    def spy(t, m, index, count, device="cpu", **kw):
        calls.append(index)
        return orig(t, m, index, count, device, **kw)

    KP.generate_shard, saved = spy, KP.generate_shard
    try:
        KP.generate_pairs(teacher, tmp_path / "r", KP.PairsConfig(**SMALL), rank=1, world=2, progress=False)
        assert calls == [1, P.HELDOUT_INDEX]           # shards at positions 1 and 3 (the held-out one)
        KP.generate_pairs(teacher, tmp_path / "r", KP.PairsConfig(**SMALL), rank=0, world=2, progress=False)
        assert calls == [1, P.HELDOUT_INDEX, 0, 2]
    finally:
        KP.generate_shard = saved
    single = KP.generate_pairs(teacher, tmp_path / "s", KP.PairsConfig(**SMALL), progress=False)
    for s in single["shards"]:
        assert same_shard(P.shard_path(tmp_path / "r", s["name"]), P.shard_path(tmp_path / "s", s["name"]))


def test_resume_after_a_kill_and_a_damaged_shard(tmp_path, monkeypatch):
    teacher, root, cfg = ring8(), tmp_path / "p", KP.PairsConfig(**SMALL)
    orig, done = KP.generate_shard, []

    def dies_on_third(t, m, index, count, device="cpu", **kw):
        if len(done) == 2:
            raise KeyboardInterrupt  # the run is killed while making the third shard
        done.append(index)
        return orig(t, m, index, count, device, **kw)

    monkeypatch.setattr(KP, "generate_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        KP.generate_pairs(teacher, root, cfg, progress=False)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["pairs.json", "train-00000.safetensors", "train-00001.safetensors"]  # no partial file
    done.clear()
    remade = []
    monkeypatch.setattr(KP, "generate_shard",
                        lambda t, m, i, c, device="cpu", **kw: remade.append(i) or orig(t, m, i, c, **kw))
    m = KP.generate_pairs(teacher, root, cfg, progress=False)
    assert remade == [2, P.HELDOUT_INDEX]              # continues at the first missing shard
    # Damage a shard: reading it names the file; a rerun regenerates exactly it, with the same content.
    path = P.shard_path(root, "train-00001")
    good = path.read_bytes()
    raw = bytearray(good)
    raw[-7] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DiffdistillError, match="train-00001.safetensors: checksum mismatch"):
        P.load_shard(root, m, "train-00001")
    path.write_bytes(good[: len(good) // 2])           # truncated
    with pytest.raises(DiffdistillError, match="train-00001.safetensors: unreadable"):
        P.load_shard(root, m, "train-00001")
    pairs = P.PairsDataset(root, m)
    assert pairs[0]["noise"].shape == (2,)             # shard 0 reads; shard 1's rows name the file
    with pytest.raises(DiffdistillError, match=r"train-00001.safetensors: unreadable \(tensor 'noise' lies at .*"
                                               r"outside the file\); rerun `diffdistill kd-pairs`"):
        pairs[250]
    remade.clear()
    logged = []
    KP.generate_pairs(teacher, root, cfg, progress=False, log=logged.append)
    assert remade == [1] and "train-00001" in logged[0]
    path.with_name("good.safetensors").write_bytes(good)
    assert same_shard(path, path.with_name("good.safetensors"))


def test_refusals(tmp_path):
    root = tmp_path / "p"
    KP.generate_pairs(ring8(), root, KP.PairsConfig(**SMALL), progress=False)
    other = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.1, 0.1])
    with pytest.raises(DiffdistillError, match="different teacher"):
        KP.generate_pairs(other, root, KP.PairsConfig(**SMALL), progress=False)
    with pytest.raises(DiffdistillError, match="different teacher"):
        P.verify_pairs(root, other)
    # What changes the pairs is refused, named with the directory's value and the one asked for.
    for change, words in ((dict(steps=5), "sampler euler with 4 steps, asked euler with 5 steps"),
                          (dict(sampler="heun"), "asked heun with 4 steps"),
                          (dict(seed=4), "seed 3, asked 4"), (dict(target_dtype="uint8"), "float16, asked uint8")):
        with pytest.raises(DiffdistillError, match="other settings.*" + words):
            KP.generate_pairs(ring8(), root, KP.PairsConfig(**dict(SMALL, **change)), progress=False)
    # A disk too small is refused before anything is written.
    huge = tmp_path / "huge"
    with pytest.raises(DiffdistillError, match="GiB are free"):
        KP.generate_pairs(ring8(), huge, KP.PairsConfig(**dict(SMALL, n_pairs=10**14, shard_size=10**12)),
                         progress=False)
    assert not huge.exists()
    with pytest.raises(DiffdistillError, match="not a pairs directory"):
        P.read_manifest(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / P.MANIFEST).write_text("{nope")
    with pytest.raises(DiffdistillError, match="malformed JSON"):
        P.read_manifest(tmp_path / "bad")


class NoisyDenoiser(Denoiser):
    def __init__(self):
        super().__init__((2,))

    def denoise(self, x, sigma, cond):
        return x * 0 + torch.randn_like(x)


def test_teachers_without_a_deterministic_sampler_are_refused():
    with pytest.raises(DiffdistillError, match="not deterministic"):
        KP.check_deterministic_teacher(NoisyDenoiser())
    from diffdistill.networks.mlp import mlp_preset

    boundary = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig(kind="boundary"))
    with pytest.raises(DiffdistillError, match="consistency-style"):
        KP.check_deterministic_teacher(boundary)
    with pytest.raises(DiffdistillError, match="not a denoiser"):
        KP.check_deterministic_teacher(torch.nn.Linear(2, 2))
    KP.check_deterministic_teacher(ring8())           # an exact denoiser passes


def test_uint8_targets_follow_the_paper():
    y = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.999, 1.0, 2.0])
    enc = P.encode_target(y, "uint8")
    assert enc.dtype == torch.uint8
    dec = P.decode_target(enc)
    clipped = y.clamp(-1, 1)
    # Truncation: never above the clipped value, less than one level below it.
    assert bool((dec <= clipped + 1e-6).all()) and bool((clipped - dec < 1 / 127.5 + 1e-6).all())
    assert enc.tolist()[:2] == [0, 0] and enc.tolist()[-2:] == [255, 255]
    assert KP.resolve_target_dtype(KP.PairsConfig(), (3, 8, 8)) == "uint8"
    assert KP.resolve_target_dtype(KP.PairsConfig(), (2,)) == "float16"


def test_the_training_pairs_are_a_data_set_read_from_the_shards(tmp_path):
    """Item i of `PairsDataset` is the i-th training row of the shards in manifest order (the held-out shard is not
    in it), as float32 noise and target in data units; a batched read equals the items one by one; pickled (to a
    DataLoader worker) it maps the shards again; a view of fewer pairs stops at them."""
    import pickle

    from safetensors.torch import load_file

    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(**SMALL), progress=False)
    pairs = P.PairsDataset(root, m)
    disk = [load_file(P.shard_path(root, f"train-{i:05d}")) for i in range(3)]   # 200, 200, 100 rows
    noise, target = (torch.cat([d[k] for d in disk]).float() for k in ("noise", "target"))
    assert len(pairs) == 500 and pairs.shape == (2,) and pairs.label_dim == 0
    items = [pairs[i] for i in range(500)]
    assert all(set(it) == {"noise", "target"} and it["noise"].dtype == it["target"].dtype == torch.float32
               for it in items)
    assert torch.equal(torch.stack([it["noise"] for it in items]), noise)
    assert torch.equal(torch.stack([it["target"] for it in items]), target)
    held = load_file(P.shard_path(root, P.HELDOUT))
    assert not set(map(tuple, held["noise"].float().tolist())) & set(map(tuple, noise.tolist()))
    ids = [499, 3, 250, 199, 200, 3]                                           # any order, across shards, repeats
    for it, i in zip(pairs.__getitems__(ids), ids):
        assert torch.equal(it["noise"], noise[i]) and torch.equal(it["target"], target[i])
    with pytest.raises(IndexError):
        pairs[500]
    with pytest.raises(IndexError):
        pairs.__getitems__([0, -1])
    again = pickle.loads(pickle.dumps(pairs))
    assert pairs._maps and not again._maps and torch.equal(again[321]["noise"], noise[321])
    view = P.PairsDataset(root, P.manifest_view(m, 300, 50))                  # shard 1 trimmed to 100 of 200 rows
    assert len(view) == 300 and torch.equal(view[299]["target"], target[299])
    with pytest.raises(IndexError):
        view[300]
    z, y, c = P.read_heldout(root, m)
    assert c is None and torch.equal(z, held["noise"].float()) and torch.equal(y, held["target"].float())
    assert P.read_heldout(root, P.manifest_view(m, 300, 0)) is None
    assert json.loads((root / "pairs.json").read_text())["teacher"] == P.teacher_fingerprint(ring8())


def test_uint8_targets_and_labels_of_a_data_set(tmp_path):
    """A class-conditional teacher's pairs carry int64 labels; uint8 targets are decoded as y / 127.5 - 1."""
    from safetensors.torch import load_file

    from diffdistill.networks.mlp import mlp_preset

    torch.manual_seed(0)
    teacher = Precond(mlp_preset("tiny", 2, label_dim=3), (2,), 3, PrecondConfig()).eval().requires_grad_(False)
    root = tmp_path / "p"
    m = KP.generate_pairs(teacher, root, KP.PairsConfig(n_pairs=20, heldout=4, shard_size=8, steps=2,
                                                        target_dtype="uint8"), progress=False)
    pairs = P.PairsDataset(root, m)
    disk = [load_file(P.shard_path(root, f"train-{i:05d}")) for i in range(3)]
    cond, target = torch.cat([d["cond"] for d in disk]), torch.cat([d["target"] for d in disk])
    assert pairs.label_dim == 3 and target.dtype == torch.uint8 and len(cond) == 20
    batch = torch.utils.data.default_collate([pairs[i] for i in range(20)])   # what the loop's DataLoader makes
    assert batch["cond"].dtype == torch.int64 and torch.equal(batch["cond"], cond)
    assert torch.equal(batch["target"], target.float() / 127.5 - 1)
    assert P.read_heldout(root, m)[2].shape == (4,)


def _generated_rows(monkeypatch) -> list[tuple[int, int]]:
    """(seed index, rows the teacher runs on) of each shard generate_pairs makes from now on."""
    calls, orig = [], KP.generate_shard

    def spy(t, m, index, count, device="cpu", keep=None, **kw):
        calls.append((index, count - (0 if keep is None else len(keep["noise"]))))
        return orig(t, m, index, count, device, keep=keep, **kw)

    monkeypatch.setattr(KP, "generate_shard", spy)
    return calls


def test_a_directory_serves_smaller_requests_and_extends_for_larger_ones(tmp_path, monkeypatch):
    """Only the pairs' identity is compared: a smaller request reads the first pairs, a larger one adds exactly the
    missing rows, and either way the pairs equal those of a fresh directory made at that size (any batch)."""
    teacher, full = ring8(), KP.PairsConfig(**SMALL)                     # 500 + 100 pairs, shards of 200
    big = KP.generate_pairs(teacher, tmp_path / "big", full, progress=False)
    calls = _generated_rows(monkeypatch)
    # Smaller, with another generation batch and shard size: nothing is generated, the first pairs are used.
    small = KP.PairsConfig(**dict(SMALL, n_pairs=300, heldout=50, batch=17, shard_size=50))
    logged = []
    view = KP.generate_pairs(teacher, tmp_path / "big", small, progress=False, log=logged.append)
    assert calls == [] and "keeps its shard size 200" in logged[0]
    assert (view["n_pairs"], view["heldout"]) == (300, 50)
    assert [(s["count"], s.get("stored")) for s in view["shards"]] == [(200, None), (100, 200), (50, 100)]
    assert json.loads((tmp_path / "big" / "pairs.json").read_text())["n_pairs"] == 500   # the directory is kept
    fresh = KP.generate_pairs(teacher, tmp_path / "fresh", KP.PairsConfig(**dict(SMALL, n_pairs=300, heldout=50,
                                                                                batch=7)), progress=False)
    a, b = P.PairsDataset(tmp_path / "big", view), P.PairsDataset(tmp_path / "fresh", fresh)
    assert len(a) == len(b) == 300
    for i in range(300):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("noise", "target"))
    for x, y in zip(P.read_heldout(tmp_path / "big", view), P.read_heldout(tmp_path / "fresh", fresh)):
        assert (x is None and y is None) or torch.equal(x, y)
    # Larger: the 300 + 50 directory grows to 500 + 100, computing only the 250 missing pairs.
    calls.clear()
    grown = KP.generate_pairs(teacher, tmp_path / "fresh", KP.PairsConfig(n_pairs=500, heldout=100, sampler=None,
                                                                       steps=None, seed=None), progress=False)
    assert sorted(calls) == [(P.HELDOUT_INDEX, 50), (1, 100), (2, 100)]
    assert grown["shards"] == big["shards"]
    for s in big["shards"]:                                          # the same pairs as made in one go
        assert same_shard(P.shard_path(tmp_path / "big", s["name"]), P.shard_path(tmp_path / "fresh", s["name"]))
    # Options left out (None) take the directory's: nothing to do.
    calls.clear()
    again = KP.generate_pairs(teacher, tmp_path / "fresh", KP.PairsConfig(**dict(AS_BEFORE, batch=3)), progress=False)
    assert calls == [] and again == grown


def test_directories_made_before_noise_blocks_keep_their_rule(tmp_path, monkeypatch):
    """A manifest with `batch` (no `block`): blocks drawn at their actual length, shards seeded by position; an
    extension keeps its pairs and gives new shards seed indices no shard has (not the held-out shard's)."""
    teacher, root = ring8(), tmp_path / "old"
    m = KP.make_manifest(teacher, KP.PairsConfig(**SMALL))
    del m["block"]
    m["batch"] = 64
    for s in m["shards"]:
        del s["index"]
    root.mkdir()
    (root / P.MANIFEST).write_text(json.dumps(m))                    # as the earlier code wrote it ...
    KP.generate_pairs(teacher, root, KP.PairsConfig(**AS_BEFORE), progress=False)     # ... and its shards
    last = P.load_shard(root, m, "train-00002")                       # 100 rows: blocks of 64 and 36
    g = torch.Generator().manual_seed(P.noise_seed(3, 2, 1))
    assert torch.equal(last["noise"][64:], torch.randn(36, 2, generator=g).half())
    held = P.shard_path(root, P.HELDOUT).read_bytes()
    calls = _generated_rows(monkeypatch)
    KP.generate_pairs(teacher, root, KP.PairsConfig(**dict(AS_BEFORE, n_pairs=700)), progress=False)
    assert sorted(calls) == [(2, 200), (4, 100)]                      # index 3 is the held-out shard's
    assert P.shard_path(root, P.HELDOUT).read_bytes() == held
    full = P.verify_pairs(root)
    noise = [P.load_shard(root, full, s["name"])["noise"][:36] for s in full["shards"]]
    assert all(not torch.equal(noise[i], noise[j]) for i in range(5) for j in range(i))


class _Bar:
    """tqdm stand-in that records its updates."""
    made: list = []

    def __init__(self, total=None, disable=False, **kw):
        self.total, self.disable, self.updates = total, disable, []
        _Bar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def close(self):
        pass


def test_progress_moves_per_batch_and_ctrl_c_says_rerun(tmp_path, monkeypatch, capsys):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    _Bar.made.clear()
    KP.generate_pairs(ring8(), tmp_path / "p", KP.PairsConfig(**SMALL), progress=True)
    bar = _Bar.made[-1]
    assert not bar.disable and bar.total == 600 and sum(bar.updates) == 600
    assert bar.updates == [64, 64, 64, 8] * 2 + [64, 36] * 2          # one move per generation batch
    KP.generate_pairs(ring8(), tmp_path / "q", KP.PairsConfig(**SMALL), progress=False)
    assert _Bar.made[-1].disable
    orig, made = KP.generate_shard, []

    def interrupted(*a, **kw):
        if made:
            raise KeyboardInterrupt
        made.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(KP, "generate_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        KP.generate_pairs(ring8(), tmp_path / "r", KP.PairsConfig(**SMALL), progress=False)
    err = capsys.readouterr().err
    assert "1 of the 4 shards" in err and "rerun to continue" in err
