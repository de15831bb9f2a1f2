"""Converter from diffusers' AutoencoderKL: numerical parity with diffusers (needs torch
and diffusers; those tests skip themselves when they are absent), key layouts, and the
weight-file readers."""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from diffusion.convert.diffusers_vae import (convert_diffusers_vae, load_sd_vae,
                                             sd_vae_config, vae_from_config)
from diffusion.convert.torch_files import load_safetensors, load_state_dict
from diffusion.models.vae import AutoencoderKL

SMALL_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}


@pytest.fixture(scope="module")
def torch_vae():
    """A small diffusers VAE with every weight randomised (norm scales and biases too)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**SMALL_CONFIG).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return vae


def _state_dict(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def flax_apply():
    module = vae_from_config(SMALL_CONFIG)
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    return module, encode, decode


def test_parity_with_diffusers(torch_vae, flax_apply):
    import torch
    module, encode, decode = flax_apply
    params = convert_diffusers_vae(_state_dict(torch_vae), SMALL_CONFIG)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        ref_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
        ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
        ref_dec = torch_vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
        ref_dec = ref_dec.numpy().transpose(0, 2, 3, 1)
    mean, logvar = encode(params, x)
    out = decode(params, z)
    assert mean.shape == ref_mean.shape and out.shape == ref_dec.shape
    # Not trivially small: the randomised weights make every output O(0.1) or more.
    assert np.abs(ref_mean).max() > 0.1 and np.abs(ref_dec).max() > 0.1
    assert _rel_err(mean, ref_mean) < 1e-4
    assert _rel_err(logvar, ref_logvar) < 1e-4
    assert _rel_err(out, ref_dec) < 1e-4


def _to_old_attention_names(sd):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.",
                   lambda m: f"attentions.0.{names[m[1]]}.", k): v for k, v in sd.items()}


def _to_ldm_layout(sd, num_levels):
    """diffusers -> original LDM names, written independently of the converter."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(\w+)$", k)
        if m:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                    "to_out.0": "proj_out"}[m[2]]
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convs
            out[f"first_stage_model.{m[1]}.mid.attn_1.{name}.{m[3]}"] = v
            continue
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample", k)
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + k] = v
    out["loss.discriminator.main.0.weight"] = np.zeros((1,), np.float32)
    return out


def test_old_attention_names_and_ldm_layout_give_same_params(torch_vae):
    sd = _state_dict(torch_vae)
    ref = convert_diffusers_vae(sd, SMALL_CONFIG)
    for variant in (_to_old_attention_names(sd), _to_ldm_layout(sd, num_levels=2)):
        assert set(variant) != set(sd)
        got = convert_diffusers_vae(variant, SMALL_CONFIG)
        jax.tree.map(np.testing.assert_array_equal, got, ref)


def test_load_sd_vae_from_folder_and_files(torch_vae, flax_apply, tmp_path):
    import torch
    _, encode, _ = flax_apply
    torch_vae.save_pretrained(tmp_path / "vae")  # config.json + .safetensors
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    ref = convert_diffusers_vae(_state_dict(torch_vae), SMALL_CONFIG)
    ref_mean = np.asarray(encode(ref, x)[0])
    # A pipeline-style folder holding vae/ works as well as the vae folder itself.
    for path in (tmp_path / "vae", tmp_path):
        module, params, scale = load_sd_vae(path)
        assert module.block_out_channels == (32, 64) and module.norm_num_groups == 8
        assert scale == pytest.approx(0.18215)
        np.testing.assert_array_equal(np.asarray(encode(params, x)[0]), ref_mean)
    torch.save(torch_vae.state_dict(), tmp_path / "w.pt")
    module, params, _ = load_sd_vae(tmp_path / "w.pt", config=SMALL_CONFIG)
    np.testing.assert_array_equal(np.asarray(encode(params, x)[0]), ref_mean)


def test_full_sd_vae_architecture_converts(tmp_path):
    """Every key of diffusers' SD VAE (83.65M params) lands on our default module."""
    diffusers = pytest.importorskip("diffusers")
    cfg = sd_vae_config()
    torch_sd = diffusers.AutoencoderKL(**{k: v for k, v in cfg.items()
                                          if k != "scaling_factor"}).state_dict()
    # Shapes are what matter here; cheap constant arrays of the right shape.
    sd = {k: np.broadcast_to(np.float32(0.5), tuple(v.shape)) for k, v in torch_sd.items()}
    params = convert_diffusers_vae(sd, AutoencoderKL())
    assert sum(p.size for p in jax.tree.leaves(params)) == 83_653_863
    assert params["decoder"]["up_blocks_0"]["resnets_2"]["conv1"]["kernel"].shape == \
        (3, 3, 512, 512)


def test_mismatched_state_dict_is_rejected():
    module = vae_from_config(SMALL_CONFIG)
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 2, 2, 3)))
    # Build a diffusers-named state dict from our own shapes by inverting the names.
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = [p.key for p in path]
        key = ".".join(re.sub(r"_(\d+)$", r".\1", n) for n in names[:-1])
        shape = leaf.shape
        if names[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2])
        sd[f"{key}.{'bias' if names[-1] == 'bias' else 'weight'}"] = np.ones(shape, np.float32)
    convert_diffusers_vae(sd, SMALL_CONFIG)  # the complete dict converts
    extra = dict(sd, **{"encoder.bogus.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected keys.*encoder.bogus.weight"):
        convert_diffusers_vae(extra, SMALL_CONFIG)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="missing params.*decoder/conv_out/bias"):
        convert_diffusers_vae(missing, SMALL_CONFIG)
    wrong = dict(sd, **{"quant_conv.weight": np.ones((8, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="quant_conv.weight: converted shape"):
        convert_diffusers_vae(wrong, SMALL_CONFIG)
    with pytest.raises(ValueError, match="shift_factor"):
        vae_from_config(dict(SMALL_CONFIG, shift_factor=0.1))


def _write_safetensors(path, tensors: dict[str, tuple[str, tuple, bytes]]):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_reader_handles_float32_and_bfloat16(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    b = np.array([1.0, -2.0, 0.15625, 24576.0], np.float32)  # exact in bfloat16
    b16 = (b.view(np.uint32) >> 16).astype("<u2").tobytes()
    _write_safetensors(tmp_path / "w.safetensors",
                       {"a": ("F32", a.shape, a.astype("<f4").tobytes()),
                        "b": ("BF16", b.shape, b16)})
    # A file written by hand, field by field, read by safetensors.numpy.
    for sd in (load_state_dict(tmp_path / "w.safetensors"),
               load_safetensors(str(tmp_path / "w.safetensors"))):
        np.testing.assert_array_equal(sd["a"], a)
        assert sd["b"].dtype == np.float32
        np.testing.assert_array_equal(sd["b"], b)
    with pytest.raises(ValueError, match="unknown weight file type"):
        (tmp_path / "w.npz").write_bytes(b"")
        load_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.safetensors")
