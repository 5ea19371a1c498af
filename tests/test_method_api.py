"""The one way in (issue 16): the method registry, typed configs, and `diffdistill.distill` beside the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffdistill import methods
from diffdistill.api import distill, distill_loop
from diffdistill.cli import distill as cli_distill
from diffdistill.errors import UsageError
from diffdistill.methods.options import config_from_namespace, make_config
from diffdistill.teachers.analytic import ring8
from tests.cli_util import parse_distill, run_cli

torch.set_num_threads(1)


@pytest.fixture
def example_method():
    """The small method of tests/example_method.py, registered for one test (what a plugin or a new method does)."""
    methods.register("example", "tests.example_method")
    yield
    methods.REGISTRY.pop("example")


def test_the_registry_is_the_only_list():
    assert methods.names() == ["kd", "pd", "di", "gdd", "cd", "dmd2", "sid"]
    assert cli_distill.METHODS == methods.names()
    for name in methods.names():
        spec = methods.get(name)
        assert spec.name == name and dataclasses.is_dataclass(spec.config) and callable(spec.create)
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        methods.get("nope")


def _teachers():
    from diffdistill.diffusion.denoiser import Precond, PrecondConfig
    from diffdistill.networks.unet import unet_preset

    torch.manual_seed(0)
    net = unet_preset("digits", 8, 1)
    return {"ring8": ring8(), "network": Precond(net, (1, 8, 8), 0, PrecondConfig(kind="edm")).eval()}


@pytest.mark.parametrize("name", ["kd", "pd", "di", "gdd", "cd", "dmd2", "sid"])
def test_python_api_and_cli_give_the_same_settings(name, tmp_path):
    """Every method's config built from its dataclass defaults equals the one the command line parses, once
    resolved for the same teacher and run (the CLI used to change defaults the dataclasses did not have)."""
    spec = methods.get(name)
    required = ["--lpips-weights", str(tmp_path / "lpips.safetensors")] if name == "cd" else []
    for kind, teacher in _teachers().items():
        loop = distill_loop(out=str(tmp_path / "run"), total_kimg=100.0, batch=128, device="cpu")
        api = make_config(spec.config, {"lpips_weights": required[1]} if required else {})
        cli = config_from_namespace(spec.config, parse_distill(name, *required))
        try:
            resolved_api = api.resolve(teacher, loop)
        except UsageError as e:           # a setting this teacher cannot take: the CLI must refuse it too
            with pytest.raises(UsageError, match=str(e)[:30]):
                cli.resolve(teacher, loop)
            continue
        assert resolved_api == cli.resolve(teacher, loop), (name, kind)


def test_unknown_settings_are_named():
    with pytest.raises(UsageError, match="distill di: unknown setting.*gen_lrr"):
        distill("di", ring8(), out="unused", gen_lrr=1e-3)


def test_a_new_method_is_one_file_and_one_registry_line(example_method, tmp_path, capsys):
    """tests/example_method.py: trained from the CLI and from Python, with the same weights for the same seed."""
    from diffdistill.io import load_snapshot

    code, out, err = run_cli(capsys, "distill", "example", "--teacher", "toy:ring8", "--out", tmp_path / "cli",
                             "--kimg", "2", "--batch", "64", "--lr", "3e-3", "--no-progress", "--seed", "3")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "distill", "example", "--help")
    assert "--sigma" in out and "--hidden" in out
    run = distill("example", "toy:ring8", loop=distill_loop(out=str(tmp_path / "api"), total_kimg=2, batch=64,
                                                            seed=3, progress=False, device="cpu"), lr=3e-3)
    assert not run.interrupted and run.model == tmp_path / "api" / "model"
    a, b = load_snapshot(tmp_path / "cli" / "model")[0], run.student()
    assert a.sampling == b.sampling == {"sampler": "onestep", "sigmas": [80.0, 0.0]}
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert not torch.equal(va, load_snapshot(tmp_path / "cli" / "model")[0].state_dict()[ka] * 0)


def test_distill_api_matches_the_cli_bit_for_bit(tmp_path, capsys):
    """`diffdistill distill di ...` and `diffdistill.distill("di", ...)` with the same settings train the same
    generator."""
    from diffdistill.io import load_snapshot

    options = dict(gen_lr=2e-3, fake_lr=2e-3, fake_warmup_steps=4)
    code, _, err = run_cli(capsys, "distill", "di", "--teacher", "toy:ring8", "--out", tmp_path / "cli", "--kimg",
                           "1", "--batch", "64", "--gen-lr", "2e-3", "--fake-lr", "2e-3", "--fake-warmup-steps",
                           "4", "--no-progress")
    assert code == 0, err
    run = distill("di", "toy:ring8", loop=distill_loop(out=str(tmp_path / "api"), total_kimg=1, batch=64,
                                                       progress=False, device="cpu"), **options)
    a, b = load_snapshot(tmp_path / "cli" / "model")[0], run.student()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert run.config.fake_warmup_steps == 4 and run.config.gen_lr == 2e-3
    # and describe the run alike in config.json (method, teacher, data: the analytic teacher's distribution)
    meta = [json.loads((tmp_path / d / "config.json").read_text())["meta"] for d in ("cli", "api")]
    assert meta[0] == meta[1] == dict(method="di", teacher="toy:ring8", data="toy:ring8", recipe=None)


def test_recipes_are_settings_for_both_ways_in(tmp_path):
    """A recipe is a dict of settings: the API applies it beneath the caller's, the CLI as options before the
    user's; both give the same config."""
    from diffdistill.api import recipe_settings

    ring = ring8()
    spec = methods.get("di")
    short = recipe_settings(spec, "short", ring, kimg=12.8, batch=64)
    assert short["gen_lr"] == 2e-3 and short["fake_warmup_steps"] == 50 and short["ema_halflife_kimg"] == 1.28
    paper = recipe_settings(spec, "cifar10")
    assert paper["gen_lr"] == 1e-5 and paper["batch"] == 128 and paper["total_kimg"] == 200000
    args = cli_distill.with_recipe(parse_distill("di", "--recipe", "cifar10", "--gen-lr", "3e-5"), ring)
    api = make_config(spec.config, {**{k: v for k, v in paper.items() if k not in ("batch", "total_kimg",
                                                                                   "ema_halflife_kimg")},
                                    "gen_lr": 3e-5})
    assert config_from_namespace(spec.config, args) == api
    assert (args.batch, args.kimg, args.ema) == (128, 200000, 500)
    with pytest.raises(UsageError, match="no recipe 'nope'"):
        recipe_settings(spec, "nope")
