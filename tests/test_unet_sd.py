"""Our UNetSD against diffusers' UNet2DConditionModel: small random SD-1-like and
SD-2-like models saved by diffusers (safetensors), converted by ours, same outputs to
1e-4 relative in float32 (needs torch and diffusers; skipped where they are absent).
Plus the converter's errors and the config's checks."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.convert.diffusers_unet import (convert_diffusers_unet, load_diffusers_unet,
                                              unet_config_from_diffusers)
from diffusion.models.unet_sd import UNetSD, UNetSDConfig, sd1_config, sd2_config

# Parity does not depend on XLA's fusions; compile time dominates these tests.

SEQ_LEN = 7

# SD 1.x's shape of config: heads given as attention_head_dim, conv proj_in/proj_out.
SD1_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8)
# SD 2.x's: linear projections, per-block heads, upcast attention; every level with
# cross-attention, and the other sinusoid convention (sin first, shifted frequencies).
SD2_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=32,
    norm_num_groups=16, use_linear_projection=True, upcast_attention=True,
    flip_sin_to_cos=False, freq_shift=1)
# The remaining options: two transformer blocks per transformer, only-cross-attention,
# a scaled mid block, a per-block layer count, the down/up block kinds swapped.
OPTIONS = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=(2, 1), attention_head_dim=2, cross_attention_dim=16,
    norm_num_groups=8, transformer_layers_per_block=2, only_cross_attention=True,
    mid_block_scale_factor=1.4, norm_eps=1e-6)


def _torch_unet(config: dict, seed: int):
    """A diffusers UNet2DConditionModel with every weight randomised (norm scales and
    biases too), so that no zero-initialised layer could hide a wrong mapping."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return model


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,config", [("sd1", SD1_LIKE), ("sd2", SD2_LIKE),
                                         ("options", OPTIONS)])
def test_parity_with_diffusers(tmp_path, name, config):
    import torch
    model = _torch_unet(config, seed=len(name))
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ours, params = load_diffusers_unet(tmp_path)  # the pipeline folder above unet/

    rng = np.random.default_rng(0)
    s = config["sample_size"]
    x = rng.normal(size=(2, s, s, config["in_channels"])).astype(np.float32)
    t = np.array([981, 17])
    ctx = rng.normal(size=(2, SEQ_LEN, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(ctx)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    # One compiled call; its third sample is the first one with the second one's text.
    out = jax.jit(UNetSD(ours).apply)({"params": params}, np.concatenate([x, x[:1]]),
                             np.concatenate([t, t[:1]]).astype(np.float32),
                             np.concatenate([ctx, ctx[1:]]))
    assert out.shape == (3, s, s, config["out_channels"]) and ref.shape == out[:2].shape
    assert np.abs(ref).max() > 0.1  # not trivially small
    assert _rel_err(out[:2], ref) < 1e-4
    assert _rel_err(out[2], out[0]) > 1e-2  # the text matters


@pytest.fixture(scope="module")
def sd1_state_dict():
    model = _torch_unet(SD1_LIKE, seed=0)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_converter_names_missing_unexpected_and_misshapen_keys(sd1_state_dict):
    sd = dict(sd1_state_dict)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    del sd[key]
    sd["down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_k.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"1 unexpected keys .*attn3.*1 missing params "
                                         r".*attn2/to_k/kernel"):
        convert_diffusers_unet(sd, SD1_LIKE)
    # A config that disagrees with the weights: the text width.
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight: converted shape \(24, 32\) "
                                         r"does not match .* \(20, 32\)"):
        convert_diffusers_unet(sd1_state_dict, {**SD1_LIKE, "cross_attention_dim": 20})
    params = convert_diffusers_unet(sd1_state_dict, SD1_LIKE)
    np.testing.assert_array_equal(
        params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
        sd1_state_dict["down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="unsupported down_block_types.*AttnDownBlock2D"):
        unet_config_from_diffusers({**SD1_LIKE, "down_block_types": [
            "AttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        unet_config_from_diffusers({**SD1_LIKE, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown .* config keys \\['frobnicate'\\]"):
        unet_config_from_diffusers({**SD1_LIKE, "frobnicate": 1})
    with pytest.raises(ValueError, match="3 attention heads .* do not divide 32"):
        UNetSDConfig(**{**SD1_LIKE, "attention_head_dim": 3})
    with pytest.raises(ValueError, match="attention_head_dim has 3 entries for 2 blocks"):
        UNetSDConfig(**{**SD1_LIKE, "attention_head_dim": (2, 2, 2)})
    # diffusers' own keys pass ('_class_name', neutral values, dropout).
    cfg = unet_config_from_diffusers({**SD1_LIKE, "_class_name": "UNet2DConditionModel",
                                      "dropout": 0.1, "act_fn": "silu",
                                      "block_out_channels": [32, 64]})
    assert cfg == UNetSDConfig(**SD1_LIKE)


def test_input_checks_and_sd_presets():
    cfg = UNetSDConfig(**SD1_LIKE)
    model = UNetSD(cfg)
    x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))
    with pytest.raises(ValueError, match="context of shape"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.zeros((1, SEQ_LEN, 16)))
    with pytest.raises(ValueError, match="not divisible by 2"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 8, 4)), t,
                       jnp.zeros((1, SEQ_LEN, 24)))
    # SD 1.x: 8 heads of 40..160 channels; SD 2.x: heads of 64 channels everywhere.
    assert sd1_config().num_heads() == (8,) * 4
    sd2 = sd2_config()
    assert [c // h for c, h in zip(sd2.block_out_channels, sd2.num_heads())] == [64] * 4


def test_sd_presets_match_diffusers_parameter_counts():
    """Our SD 1.x / 2.x configs build diffusers' parameter counts (860M / 866M),
    counted from shapes only."""
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs in ((sd1_config(), dict(cross_attention_dim=768)),
                         (sd2_config(), dict(cross_attention_dim=1024,
                                             attention_head_dim=(5, 10, 20, 20),
                                             use_linear_projection=True))):
        shapes = jax.eval_shape(UNetSD(ours).init, jax.random.key(0),
                                jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                jnp.zeros((1, 1, ours.cross_attention_dim)))
        n_ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        import torch
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel(**theirs)
        assert n_ours == sum(p.numel() for p in ref.parameters())


def test_config_json_round_trip(tmp_path):
    """A config.json as diffusers writes it (lists, nulls) maps to the same config."""
    raw = json.loads(json.dumps({**SD2_LIKE, "sample_size": None,
                                 "mid_block_only_cross_attention": None}))
    cfg = unet_config_from_diffusers(raw)
    assert cfg.attention_head_dim == (2, 4) and cfg.sample_size == 64
    assert cfg.use_linear_projection and not cfg.flip_sin_to_cos
