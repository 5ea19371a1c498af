"""EDM pickle conversion: pickles in EDM's persistence layout are built here (no EDM code needed), converted
without executing anything, and the converted snapshot must reproduce our Precond(network) with the same
weights exactly. Malicious, truncated and foreign pickles are refused with one-line errors, and nothing is
written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.cli.main import main
from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError
from diffdistill.io import load_snapshot
from diffdistill.networks.adm import ADMUNet
from diffdistill.networks.unet import UNet
from diffdistill.teachers.edm import convert_edm_pickle, denoiser_from_edm_pickle

# --------------------------------------------------------------------------------------------------
# Writing pickles in EDM's layout: every persistent object reduces to
# torch_utils.persistence._reconstruct_persistent_obj(meta), meta = {type, version, module_src, class_name,
# state}, where state is the module's __dict__ plus _init_args/_init_kwargs. Containers are real torch
# ModuleDicts. The module name exists in sys.modules only while pickling.


@contextlib.contextmanager
def _fake_edm_persistence():
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the converter
        raise AssertionError("EDM's reconstruct function must not run")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        yield module
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class _Persistent:
    def __init__(self, class_name: str, state: dict, init_kwargs: dict | None, source: str):
        self.class_name, self.state, self.init_kwargs, self.source = class_name, state, init_kwargs, source

    def __reduce__(self):
        state = dict(self.state, _init_args=(), _init_kwargs=self.init_kwargs)
        meta = dict(type="class", version=6, module_src=self.source, class_name=self.class_name, state=state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


_EDM_NAMES = {"UNet": "SongUNet", "ADMUNet": "DhariwalUNet"}


def _mirror(module: nn.Module, source: str, class_name=None, init_kwargs=None):
    """An EDM-layout copy of `module` holding the same tensors (as nn.Parameter / buffers)."""
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container._modules = OrderedDict((k, _mirror(v, source)) for k, v in module._modules.items())
        return container
    def param(v):
        return None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False)

    state = dict(
        training=False,
        _parameters=OrderedDict((k, param(v)) for k, v in module._parameters.items()),
        _buffers=OrderedDict((k, None if v is None else v.detach().clone())
                             for k, v in module._buffers.items()),
        _non_persistent_buffers_set=set(),
        _modules=OrderedDict((k, None if v is None else _mirror(v, source))
                             for k, v in module._modules.items()),
        _forward_hooks=OrderedDict(),
    )
    if hasattr(module, "skip_scale"):
        state["skip_scale"] = np.sqrt(np.float64(module.skip_scale) ** 2)  # EDM stores a numpy float64
    name = class_name or _EDM_NAMES.get(type(module).__name__, type(module).__name__)
    return _Persistent(name, state, init_kwargs or {}, source)


def _edm_pickle(path: Path, denoiser: Precond, precond_class: str, source: str,
                precond_state: dict | None = None) -> Path:
    """Write `denoiser` as an EDM network-snapshot pickle: dict(ema=<Precond>, loss_fn=..., ...)."""
    net_kwargs = {k: v for k, v in denoiser.backbone.config().items() if k != "name"}
    channels, res = denoiser.shape[0], denoiser.shape[1]
    state = dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(),
                 _modules=OrderedDict(model=_mirror(denoiser.backbone, source, init_kwargs=net_kwargs)),
                 img_resolution=res, img_channels=channels, label_dim=denoiser.label_dim, use_fp16=False,
                 **(precond_state or {}))
    model_kwargs = {k: v for k, v in net_kwargs.items()
                    if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    init_kwargs = dict(img_resolution=res, img_channels=channels, label_dim=denoiser.label_dim,
                       use_fp16=False, model_type=_EDM_NAMES[type(denoiser.backbone).__name__],
                       **model_kwargs)
    data = dict(ema=_Persistent(precond_class, state, init_kwargs, source),
                loss_fn=_Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), {}, source),
                augment_pipe=None, dataset_kwargs=dict(path="datasets/cifar10-32x32.zip", xflip=False))
    with _fake_edm_persistence():
        path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not name.endswith("resample_filter"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    return module


TINY_SONG = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
                 channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.13)
CASES = {
    # DDPM++ (cifar10-cond-vp style: EDMPrecond, class labels, augment labels)
    "edm-ddpmpp-cond": (UNet, dict(TINY_SONG, label_dim=4, augment_dim=9), "EDMPrecond",
                        dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
                        PrecondConfig(kind="edm")),
    # NCSN++ under VEPrecond
    "ve-ncsnpp": (UNet, dict(TINY_SONG, embedding_type="fourier", channel_mult_noise=2,
                             encoder_type="residual", resample_filter=[1, 3, 3, 1]),
                  "VEPrecond", dict(sigma_min=0.02, sigma_max=100),
                  PrecondConfig(kind="ve", sigma_min=0.02, sigma_max=80.0)),
    # DDPM++ under VPPrecond
    "vp-ddpmpp": (UNet, TINY_SONG, "VPPrecond",
                  dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, sigma_min=0.0010005,
                       sigma_max=152.17),
                  PrecondConfig(kind="vp", sigma_min=0.002, sigma_max=80.0)),
    # ADM (imagenet-64-cond-adm style), EDM's own constructor arguments (64 channels per attention head)
    "edm-adm-cond": (ADMUNet, dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=5,
                                   model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4],
                                   dropout=0.1),
                     "EDMPrecond", dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
                     PrecondConfig(kind="edm")),
}


def _reference(case: str, seed: int = 0) -> Precond:
    cls, kwargs, _, _, cfg = CASES[case]
    net = _randomise(cls(**kwargs), seed)
    return Precond(net, (3, 8, 8), kwargs.get("label_dim", 0), cfg).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_convert_reproduces_our_precond_exactly(case, tmp_path):
    marker = tmp_path / "source-ran"
    # The embedded module source would create the marker file if it were ever executed.
    source = f"open({str(marker)!r}, 'w').write('EDM source executed')\n"
    reference = _reference(case)
    _, _, precond_class, precond_state, cfg = CASES[case]
    pkl = _edm_pickle(tmp_path / "network-snapshot.pkl", reference, precond_class, source, precond_state)

    out = convert_edm_pickle(pkl, tmp_path / "teacher")
    assert not marker.exists()
    denoiser, sampling, meta = load_snapshot(out)
    assert sampling == {"sampler": "heun", "steps": 18}
    assert meta["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert meta["edm_precond"] == precond_class and meta["source"] == str(pkl.resolve())
    assert denoiser.precond.kind == cfg.kind
    assert (denoiser.sigma_min, denoiser.sigma_max) == pytest.approx((cfg.sigma_min, cfg.sigma_max))
    assert denoiser.backbone.config() == reference.backbone.config()

    # Every tensor copied bit for bit, and the same outputs.
    ours = reference.state_dict()
    theirs = denoiser.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen) * 2
    sigma = torch.tensor([0.01, 1.0, 40.0])
    labels = torch.tensor([0, 1, 3]) if reference.label_dim else None
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma, labels), reference(x, sigma, labels))


def test_cli_convert_edm(tmp_path, capsys):
    pkl = _edm_pickle(tmp_path / "edm.pkl", _reference("edm-ddpmpp-cond"), "EDMPrecond", "pass\n")
    assert main(["convert", "edm", str(pkl), str(tmp_path / "out")]) == 0
    assert "EDMPrecond/SongUNet" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # A second conversion into the same (non-empty) directory is refused with a one-line error.
    assert main(["convert", "edm", str(pkl), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not an empty directory" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["convert"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------------------------------
# Refusals: nothing runs, nothing is written


def _assert_refused(pkl: Path, out: Path, match: str):
    with pytest.raises(DiffdistillError, match=match) as exc:
        convert_edm_pickle(pkl, out)
    message = str(exc.value)
    assert str(pkl) in message and "\n" not in message
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"ema": _Shell(f"touch {marker}")}))
    _assert_refused(pkl, tmp_path / "out", r"refusing to load global (posix|os|nt)\.system")
    assert not marker.exists()

    # Hidden deep inside an otherwise valid EDM pickle (an attribute of a layer of the network).
    model = _mirror(_reference("edm-ddpmpp-cond").backbone, "pass\n")
    model.state["_modules"]["enc"]._modules["8x8_conv"].state["payload"] = _Shell(f"touch {marker}")
    hidden = tmp_path / "hidden.pkl"
    with _fake_edm_persistence():
        precond = _Persistent("EDMPrecond", dict(_modules=OrderedDict(model=model)), {}, "pass\n")
        hidden.write_bytes(pickle.dumps({"ema": precond}, protocol=4))
    _assert_refused(hidden, tmp_path / "out", r"refusing to load global (posix|os|nt)\.system")
    assert not marker.exists()

    builtin = tmp_path / "eval.pkl"
    builtin.write_bytes(pickle.dumps({"ema": _Eval()}))
    _assert_refused(builtin, tmp_path / "out", r"builtins\.eval")


def test_refuses_truncated_and_foreign_files(tmp_path):
    pkl = _edm_pickle(tmp_path / "edm.pkl", _reference("edm-ddpmpp-cond"), "EDMPrecond", "pass\n")
    data = pkl.read_bytes()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_refused(truncated, tmp_path / "out", "truncated or corrupt|unreadable")

    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"state_dict": OrderedDict(w=[1, 2, 3])}))
    _assert_refused(foreign, tmp_path / "out", "not an EDM network pickle")
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2, 3]))
    _assert_refused(listing, tmp_path / "out", "not an EDM network pickle")
    text = tmp_path / "text.pkl"
    text.write_text("this is not a pickle\n")
    _assert_refused(text, tmp_path / "out", "truncated or corrupt|unreadable")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    _assert_refused(empty, tmp_path / "out", "truncated or corrupt")
    with pytest.raises(DiffdistillError, match="no such file"):
        convert_edm_pickle(tmp_path / "missing.pkl", tmp_path / "out")


def test_refuses_mismatched_tensors(tmp_path):
    reference = _reference("edm-ddpmpp-cond")
    # A tensor missing from the pickle.
    del reference.backbone.dec["8x8_aux_conv"]._parameters["bias"]
    reference.backbone.dec["8x8_aux_conv"].bias = None
    pkl = _edm_pickle(tmp_path / "missing.pkl", reference, "EDMPrecond", "pass\n")
    _assert_refused(pkl, tmp_path / "out", r"1 missing.*dec\.8x8_aux_conv\.bias")

    # A tensor with the wrong shape.
    reference = _reference("edm-ddpmpp-cond")
    reference.backbone.map_layer1._parameters["bias"] = nn.Parameter(torch.zeros(7))
    pkl = _edm_pickle(tmp_path / "shape.pkl", reference, "EDMPrecond", "pass\n")
    _assert_refused(pkl, tmp_path / "out", r"map_layer1\.bias has shape \(7,\)")

    # Unsupported wrappers and schedules.
    pkl = _edm_pickle(tmp_path / "iddpm.pkl", _reference("edm-adm-cond"), "iDDPMPrecond", "pass\n")
    _assert_refused(pkl, tmp_path / "out", "iDDPMPrecond networks are not supported")
    pkl = _edm_pickle(tmp_path / "vp.pkl", _reference("vp-ddpmpp"), "VPPrecond", "pass\n", dict(beta_d=10.0))
    _assert_refused(pkl, tmp_path / "out", "beta_d=10.0 is not supported")


def test_denoiser_from_pickle_without_writing(tmp_path):
    reference = _reference("edm-adm-cond", seed=3)
    pkl = _edm_pickle(tmp_path / "adm.pkl", reference, "EDMPrecond", "pass\n")
    denoiser, meta = denoiser_from_edm_pickle(pkl)
    assert meta["edm_network"] == "DhariwalUNet" and meta["num_tensors"] == len(reference.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adm.pkl"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(denoiser(x, 2.0, torch.tensor([4, 0])), reference(x, 2.0, torch.tensor([4, 0])))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    pkl = _edm_pickle(tmp_path / "edm.pkl", _reference("edm-ddpmpp-cond"), "EDMPrecond", "pass\n")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("diffdistill.io.atomic_save_tensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_edm_pickle(pkl, tmp_path / "new" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.pkl"]
