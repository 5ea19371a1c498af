"""Backbones: shapes, config round trips, conditioning, EDM names/shapes/parameter counts, layer oracles."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError
from diffdistill.networks import build_network
from diffdistill.networks.adm import ADMUNet, adm_preset
from diffdistill.networks.mlp import MLP, mlp_preset
from diffdistill.networks.unet import Conv2d, UNet, UNetBlock, unet_preset


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide wiring bugs); filters kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not name.endswith("resample_filter"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)
    return module


NETS = {
    "unet-ddpmpp": lambda L: unet_preset("tiny", 8, 3, label_dim=L),
    "unet-ncsnpp": lambda L: unet_preset("tiny", 8, 3, label_dim=L, embedding_type="fourier",
                                         channel_mult_noise=2, encoder_type="residual",
                                         resample_filter=[1, 3, 3, 1], augment_dim=9),
    "unet-skip": lambda L: unet_preset("tiny", 8, 3, label_dim=L, encoder_type="skip", decoder_type="skip"),
    "adm": lambda L: adm_preset("tiny", 8, 3, label_dim=L),
    "mlp": lambda L: mlp_preset("tiny", 2, label_dim=L),
}


def _inputs(net, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (2,) if isinstance(net, MLP) else (3, 8, 8)
    return torch.randn(batch, *shape, generator=gen), torch.randn(batch, generator=gen)


@pytest.mark.parametrize("label_dim", [0, 4])
@pytest.mark.parametrize("kind", list(NETS))
def test_shape_and_config_round_trip(kind, label_dim):
    net = _randomise(NETS[kind](label_dim)).eval()
    x, c_noise = _inputs(net)
    labels = F.one_hot(torch.tensor([0, 1, 3]), label_dim).float() if label_dim else None
    out = net(x, c_noise, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()

    cfg = net.config()
    assert json.loads(json.dumps(cfg)) == cfg and cfg["name"] in ("unet", "adm", "mlp")
    rebuilt = build_network(cfg).eval()
    assert type(rebuilt) is type(net) and rebuilt.config() == cfg
    rebuilt.load_state_dict(net.state_dict())  # strict: same names and shapes
    assert torch.equal(rebuilt(x, c_noise, labels), out)


@pytest.mark.parametrize("kind", list(NETS))
def test_conditioning_paths(kind):
    net = _randomise(NETS[kind](4)).eval()
    x, c_noise = _inputs(net, batch=2)
    onehot = torch.eye(4)[[0, 2]]
    with_labels = net(x, c_noise, onehot)
    # Class labels and noise level both change the output.
    assert not torch.allclose(with_labels, net(x, c_noise, torch.eye(4)[[1, 3]]))
    assert not torch.allclose(with_labels, net(x, c_noise + 0.5, onehot))
    # No labels means all-zero one-hot rows (the unconditional path used by classifier-free guidance).
    assert torch.allclose(net(x, c_noise, None), net(x, c_noise, torch.zeros(2, 4)), atol=1e-6)
    # Label dropout p=1 in training mode drops every label (dropout elsewhere is 0 in the tiny presets).
    net.label_dropout = 1.0
    net.train()
    assert torch.allclose(net(x, c_noise, onehot), net.eval()(x, c_noise, None), atol=1e-6)


@pytest.mark.parametrize("kind", list(NETS))
def test_batch_independence(kind):
    """Sample k's output depends on sample k only (no norm statistics across the batch in eval mode)."""
    net = _randomise(NETS[kind](0)).eval()
    x, c_noise = _inputs(net, batch=4)
    full = net(x, c_noise, None)
    single = torch.cat([net(x[i:i + 1], c_noise[i:i + 1], None) for i in range(4)])
    assert torch.allclose(full, single, atol=1e-5)


def test_augment_labels_none_equals_zeros():
    """EDM's map_augment has no bias: augment_labels=None equals zero augment labels (algorithms.md §1.2)."""
    net = _randomise(unet_preset("tiny", 8, 3, augment_dim=9)).eval()
    x, c_noise = _inputs(net)
    assert torch.allclose(net(x, c_noise, None), net(x, c_noise, None, torch.zeros(3, 9)), atol=1e-6)
    assert not torch.allclose(net(x, c_noise, None), net(x, c_noise, None, torch.ones(3, 9)))


@pytest.mark.parametrize("kind", ["unet-ddpmpp", "adm", "mlp"])
def test_precond_edm_is_identity_at_sigma_zero(kind):
    """EDM preconditioning: c_skip(0) = 1, c_out(0) = 0, so D(x; sigma -> 0) = x (algorithms.md §1.1)."""
    net = _randomise(NETS[kind](0))
    shape = (2,) if kind == "mlp" else (3, 8, 8)
    den = Precond(net, shape, 0, PrecondConfig(kind="edm")).eval()
    x = torch.randn(2, *shape)
    assert torch.allclose(den(x, 1e-7), x, atol=1e-5)
    assert not torch.allclose(den(x, 1.0), x, atol=1e-3)
    # Boundary scalings: D(x, sigma_min) == x exactly.
    den_b = Precond(net, shape, 0, PrecondConfig(kind="boundary", sigma_min=0.002)).eval()
    assert torch.allclose(den_b(x, 0.002), x, atol=1e-6)


def test_presets_at_their_resolutions():
    assert unet_preset("digits", 8, 1)(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)
    net = unet_preset("mnist", 28, 1, label_dim=10)  # levels 28 -> 14 -> 7
    assert any(k.startswith("enc.7x7_") for k in net.state_dict())
    assert net(torch.randn(1, 1, 28, 28), torch.zeros(1), torch.eye(10)[:1]).shape == (1, 1, 28, 28)
    assert mlp_preset("toy", 2)(torch.randn(5, 2), torch.zeros(5)).shape == (5, 2)
    with pytest.raises(ValueError, match="divisible"):
        unet_preset("tiny", 9, 3)
    with pytest.raises(ValueError, match="preset"):
        unet_preset("nope", 8, 3)


# --------------------------------------------------------------------------------------------------
# EDM compatibility: parameter counts and state_dict names/shapes of the published configs.
# Reference numbers: EDM's DDPM++ CIFAR-10 network has 55.7M parameters (algorithms.md §1.3). The exact
# counts, key counts and shapes below come from EDM's SongUNet/DhariwalUNet (training/networks.py),
# instantiated through NVIDIA Modulus' port of them (checked once outside the test suite, not a dependency).


def _cifar10_ddpmpp(label_dim=0, augment_dim=0) -> UNet:
    with torch.device("meta"):
        return unet_preset("cifar10", 32, 3, label_dim=label_dim, augment_dim=augment_dim)


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_match_edm():
    assert round(_count(_cifar10_ddpmpp()) / 1e6, 2) == 55.73
    assert _count(_cifar10_ddpmpp(label_dim=10, augment_dim=9)) == 55_735_299
    with torch.device("meta"):
        adm = adm_preset("imagenet64", 64, 3, label_dim=1000)
    assert _count(adm) == 295_899_267 and round(_count(adm) / 1e6, 2) == 295.90


EDM_SONGUNET_KEYS = {  # EDM SongUNet, CIFAR-10 DDPM++, label_dim=10, augment_dim=9
    "map_label.weight": (128, 10),
    "map_augment.weight": (128, 9),
    "map_layer0.weight": (512, 128),
    "map_layer1.bias": (512,),
    "enc.32x32_conv.weight": (128, 3, 3, 3),
    "enc.32x32_block0.norm0.weight": (128,),
    "enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
    "enc.32x32_block0.affine.weight": (256, 512),
    "enc.32x32_block0.conv1.weight": (256, 256, 3, 3),
    "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
    "enc.16x16_down.skip.weight": (256, 256, 1, 1),
    "enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
    "enc.16x16_block0.proj.weight": (256, 256, 1, 1),
    "enc.16x16_block0.norm2.bias": (256,),
    "dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
    "dec.8x8_block0.skip.weight": (256, 512, 1, 1),
    "dec.16x16_up.conv0.weight": (256, 256, 3, 3),
    "dec.16x16_block4.proj.weight": (256, 256, 1, 1),
    "dec.32x32_block4.skip.weight": (256, 384, 1, 1),
    "dec.32x32_aux_norm.weight": (256,),
    "dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    "dec.32x32_aux_conv.bias": (3,),
}
EDM_NCSNPP_KEYS = {
    "map_noise.freqs": (128,),
    "enc.16x16_aux_residual.weight": (256, 3, 3, 3),
    "enc.16x16_aux_residual.resample_filter": (1, 1, 4, 4),
    "enc.8x8_aux_residual.weight": (256, 256, 3, 3),
}
EDM_DHARIWAL_KEYS = {  # EDM DhariwalUNet, ImageNet-64 ADM, label_dim=1000
    "map_label.weight": (768, 1000),
    "map_layer0.weight": (768, 192),
    "enc.64x64_conv.weight": (192, 3, 3, 3),
    "enc.32x32_down.skip.resample_filter": (1, 1, 2, 2),
    "enc.32x32_block0.qkv.weight": (1152, 384, 1, 1),
    "enc.8x8_block2.affine.weight": (1536, 768),
    "dec.8x8_in0.proj.weight": (768, 768, 1, 1),
    "dec.64x64_block3.skip.weight": (192, 384, 1, 1),
    "out_norm.weight": (192,),
    "out_conv.weight": (3, 192, 3, 3),
}


def _shapes(net) -> dict:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_state_dict_names_match_edm():
    ddpmpp = _shapes(_cifar10_ddpmpp(label_dim=10, augment_dim=9))
    assert len(ddpmpp) == 427
    assert {k: ddpmpp.get(k) for k in EDM_SONGUNET_KEYS} == EDM_SONGUNET_KEYS
    with torch.device("meta"):
        ncsnpp = _shapes(unet_preset("cifar10-ncsnpp", 32, 3))
        adm = _shapes(adm_preset("imagenet64", 64, 3, label_dim=1000))
    assert {k: ncsnpp.get(k) for k in EDM_NCSNPP_KEYS} == EDM_NCSNPP_KEYS
    assert len(adm) == 553
    assert {k: adm.get(k) for k in EDM_DHARIWAL_KEYS} == EDM_DHARIWAL_KEYS


def test_gdd_i_freezing_rule_selects_edm_layers():
    """GDD-I freezes names containing (block|up|down|in) and (conv|proj) (algorithms.md §5.3)."""
    names = [k for k in _cifar10_ddpmpp().state_dict() if not k.endswith("resample_filter")]
    frozen = {k for k in names if any(s in k for s in ("block", "up", "down", "in"))
              and any(s in k for s in ("conv", "proj"))}
    assert "enc.32x32_block0.conv0.weight" in frozen and "dec.8x8_in1.conv1.bias" in frozen
    assert "enc.16x16_down.conv0.weight" in frozen and "enc.16x16_block0.proj.weight" in frozen
    for kept in ("enc.32x32_conv.weight", "dec.32x32_aux_conv.weight", "dec.32x32_aux_norm.weight",
                 "enc.16x16_block0.qkv.weight", "enc.32x32_block0.skip.weight",
                 "enc.32x32_block0.affine.weight",
                 "enc.32x32_block0.norm0.weight", "map_layer0.weight"):
        assert kept in names and kept not in frozen
    # Exactly the 3x3 convs of the residual blocks and the attention output projections.
    expected = {k for k in names if k.split(".")[-2] in ("conv0", "conv1", "proj")}
    assert frozen == expected


# --------------------------------------------------------------------------------------------------
# Closed-form layer oracles


def test_resampling_oracles():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, 0, down=True, resample_filter=[1, 1])
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    up = Conv2d(3, 3, 0, up=True, resample_filter=[1, 1])
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)
    # [1,3,3,1] preserves constants away from the border, up and down.
    ones = torch.ones(1, 2, 8, 8)
    assert torch.allclose(Conv2d(2, 2, 0, down=True, resample_filter=[1, 3, 3, 1])(ones)[..., 1:-1, 1:-1],
                          torch.ones(1, 2, 2, 2))
    assert torch.allclose(Conv2d(2, 2, 0, up=True, resample_filter=[1, 3, 3, 1])(ones)[..., 2:-2, 2:-2],
                          torch.ones(1, 2, 12, 12))


def test_attention_matches_formula():
    """Self-attention = proj(softmax(q^T k / sqrt(c)) v) per head, added to the block output (heads split the
    qkv channels as [head, channel, (q,k,v)])."""
    torch.manual_seed(0)
    block = _randomise(UNetBlock(16, 16, 8, attention=True, channels_per_head=8, adaptive_scale=True)).eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    out = block(x, emb)
    # Recompute with the attention switched off, then add the attention by the formula.
    heads = block.num_heads
    block.num_heads = 0
    h = block(x, emb)
    block.num_heads = heads
    qkv = block.qkv(block.norm2(h)).reshape(2, heads, 8, 3, 16)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, heads, c, pixels]
    w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(8), dim=-1)
    a = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(2, 16, 4, 4)
    assert torch.allclose(out, (block.proj(a) + h) * block.skip_scale, atol=1e-5)


def test_build_network_errors():
    with pytest.raises(DiffdistillError, match="unknown network"):
        build_network({"name": "songunet"})
    cfg = unet_preset("tiny", 8, 3).config()
    with pytest.raises(DiffdistillError, match="unknown config keys"):
        build_network(dict(cfg, bogus=1))
    assert isinstance(build_network(adm_preset("tiny", 8, 3).config()), ADMUNet)
