"""Parity of the official-DiT converter: a small PyTorch DiT with the official key names and
math (written here from the paper and the official layout), randomly initialised, must
give the same output as our Flax DiT with converted weights. Also checks the torch-free
.pt reader and the .safetensors reader. Needs torch (CPU) and safetensors."""
import argparse
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
tnn = torch.nn

from diffusion.convert.dit_official import (convert_dit_state_dict,  # noqa: E402
                                            dit_kwargs_from_state_dict, load_dit_checkpoint,
                                            load_torch_file)
from diffusion.models.dit import DiT, stack_blocks, unstack_blocks  # noqa: E402


# ------------------------------------------------------------ reference PyTorch DiT

def official_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The official recipe: meshgrid with w first; first half of channels from grid[0]."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(tnn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, tnn.Linear(d, 3 * d), tnn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(tnn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(d, hidden), tnn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(tnn.functional.gelu(self.fc1(x), approximate="tanh"))


class Block(tnn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = Attention(d, heads), Mlp(d, 4 * d)
        self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class Final(tnn.Module):
    def __init__(self, d, p, c_out):
        super().__init__()
        self.norm_final = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = tnn.Linear(d, p * p * c_out)
        self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Sub(tnn.Module):  # holder giving the official attribute paths
    pass


class TorchDiT(tnn.Module):
    def __init__(self, input_size, p, c, d, depth, heads, num_classes, learn_sigma=True):
        super().__init__()
        self.p, self.c_out = p, 2 * c if learn_sigma else c
        self.x_embedder = Sub()
        self.x_embedder.proj = tnn.Conv2d(c, d, p, stride=p)
        self.t_embedder = Sub()
        self.t_embedder.mlp = tnn.Sequential(tnn.Linear(256, d), tnn.SiLU(), tnn.Linear(d, d))
        self.y_embedder = Sub()
        self.y_embedder.embedding_table = tnn.Embedding(num_classes + 1, d)
        pos = official_pos_embed(d, input_size // p)
        self.pos_embed = tnn.Parameter(torch.from_numpy(pos).float()[None],
                                       requires_grad=False)
        self.blocks = tnn.ModuleList([Block(d, heads) for _ in range(depth)])
        self.final_layer = Final(d, p, self.c_out)

    def forward(self, x, t, y):  # x [B, C, H, W]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))
        c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        b, n, _ = h.shape
        g = int(math.isqrt(n))
        h = h.reshape(b, g, g, self.p, self.p, self.c_out)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.c_out, g * self.p,
                                                         g * self.p)


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------ tests

SMALL = dict(input_size=8, p=2, c=4, d=64, depth=2, heads=4, num_classes=10)


@pytest.fixture(scope="module")
def torch_dit():
    torch.manual_seed(0)
    model = TorchDiT(**SMALL).eval()
    with torch.no_grad():  # make every layer matter, the zero-init ones included
        for name, prm in model.named_parameters():
            if prm.requires_grad:
                prm.normal_(0.0, 0.02 if "embedding_table" in name else 0.15)
    return model


def test_keys_match_official_layout(torch_dit):
    keys = set(torch_dit.state_dict())
    assert {"x_embedder.proj.weight", "t_embedder.mlp.2.bias", "pos_embed",
            "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight",
            "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight"} <= keys


def test_converted_output_matches_torch(torch_dit):
    sd = numpy_state(torch_dit)
    kwargs = dit_kwargs_from_state_dict(sd, num_heads=SMALL["heads"])
    assert kwargs == dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64,
                          depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10,
                          learn_sigma=True)
    model = DiT(**kwargs)
    params = convert_dit_state_dict(sd, num_heads=SMALL["heads"])
    expect = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, expect)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([0.0, 17.5, 999.0], np.float32)
    y = np.array([3, 9, 10], np.int32)  # 10 = the official null (CFG) row
    with torch.no_grad():
        ref = torch_dit(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(y).long()).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
    assert out.shape == (3, 8, 8, 8)
    assert np.abs(ref).mean() > 0.1  # a meaningful signal, not near-zero
    # Measured: 4e-6 norm-relative error. Tight enough that exact instead of tanh GELU
    # (9e-5) fails.
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-5
    # our negative label is the same null row
    out_neg = np.asarray(jax.jit(model.apply)({"params": params}, x, t,
                                              np.array([3, 9, -1], np.int32)))
    np.testing.assert_allclose(out_neg, out, atol=1e-6)


def test_pt_reader_without_torch(torch_dit, tmp_path):
    sd = numpy_state(torch_dit)
    path = tmp_path / "plain.pt"
    torch.save(torch_dit.state_dict(), path)
    got = load_torch_file(str(path))
    assert set(got) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])

    # a training checkpoint: picks 'ema'; views, fp16 and bf16 tensors come back right
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ema = {"w_t": base.t(), "row": base[1], "half": base.half(), "bf16": base.bfloat16()}
    ckpt = {"model": {"w": base}, "ema": ema,
            "opt": {"state": {0: {"exp_avg": base * 2}}}, "args": argparse.Namespace(lr=1)}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    got = load_torch_file(str(tmp_path / "ckpt.pt"))
    assert set(got) == set(ema)
    np.testing.assert_array_equal(got["w_t"], base.t().numpy())
    np.testing.assert_array_equal(got["row"], base[1].numpy())
    np.testing.assert_array_equal(got["half"].astype(np.float32), base.numpy())
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), base.numpy())
    np.testing.assert_array_equal(load_torch_file(str(tmp_path / "ckpt.pt"), "model")["w"],
                                  base.numpy())

    # anything but tensors and containers is refused, not executed
    torch.save({"w": base, "f": math.sqrt}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="math.sqrt"):
        load_torch_file(str(tmp_path / "evil.pt"))


def test_load_checkpoint_from_safetensors(torch_dit, tmp_path):
    sd = numpy_state(torch_dit)
    path = str(tmp_path / "dit.safetensors")
    safetensors_numpy.save_file(sd, path)
    model, variables = load_dit_checkpoint(path, num_heads=4)
    assert (model.hidden_size, model.depth, model.num_classes) == (64, 2, 10)
    x = np.zeros((1, 8, 8, 4), np.float32)
    t = np.array([5.0], np.float32)
    y = np.array([1], np.int32)
    with torch.no_grad():
        ref = torch_dit(torch.zeros(1, 4, 8, 8), torch.tensor([5.0]), torch.tensor([1]))
    out = jax.jit(model.apply)(variables, x, t, y)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_variant_layout_matches_our_tree():
    # the official S/8 layout (random weights; no forward) converts onto DiT.from_variant
    ref = TorchDiT(input_size=32, p=8, c=4, d=384, depth=12, heads=6, num_classes=1000)
    params = convert_dit_state_dict(numpy_state(ref), "S/8")
    model = DiT.from_variant("S/8", input_size=32, in_channels=4, num_classes=1000,
                             learn_sigma=True)
    expect = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, expect)


def test_converter_errors(torch_dit):
    sd = numpy_state(torch_dit)
    with pytest.raises(ValueError, match="variant 'S/2'"):
        convert_dit_state_dict(sd, "S/2")
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        convert_dit_state_dict({**sd, "extra.weight": np.zeros(3)}, num_heads=4)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        convert_dit_state_dict(missing, num_heads=4)
    with pytest.raises(ValueError, match="pos_embed"):
        convert_dit_state_dict({**sd, "pos_embed": sd["pos_embed"] + 0.1}, num_heads=4)
    with pytest.raises(ValueError, match="input_size"):
        convert_dit_state_dict({k: v for k, v in sd.items() if k != "pos_embed"},
                               num_heads=4)
    with pytest.raises(ValueError, match="variant or num_heads"):
        dit_kwargs_from_state_dict(sd)


def test_scanned_layout_matches_torch(torch_dit, tmp_path):
    sd = numpy_state(torch_dit)
    unrolled = convert_dit_state_dict(sd, num_heads=4)
    scanned = convert_dit_state_dict(sd, num_heads=4, scan_blocks=True)
    assert "block_0" not in scanned and scanned["blocks"]["fc1"]["kernel"].shape == (2, 64, 256)
    jax.tree.map(np.testing.assert_array_equal, scanned, stack_blocks(unrolled))
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(scanned), unrolled)
    model = DiT(**dit_kwargs_from_state_dict(sd, num_heads=4), scan_blocks=True)
    expect = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(lambda s: s.shape, expect)

    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3.0, 400.0], np.float32)
    y = np.array([1, 10], np.int32)
    with torch.no_grad():
        ref = torch_dit(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(y).long()).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(model.apply)({"params": scanned}, x, t, y))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    # load_dit_checkpoint: "auto" keeps this 2-block model unrolled; True scans it
    path = str(tmp_path / "dit.safetensors")
    safetensors_numpy.save_file(sd, path)
    m_auto, v_auto = load_dit_checkpoint(path, num_heads=4)
    assert not m_auto.scan_blocks and "block_1" in v_auto["params"]
    m_scan, v_scan = load_dit_checkpoint(path, num_heads=4, scan_blocks=True)
    assert m_scan.scan_blocks and "blocks" in v_scan["params"]
    np.testing.assert_allclose(np.asarray(jax.jit(m_scan.apply)(v_scan, x, t, y)), out,
                               rtol=1e-5, atol=1e-6 * np.abs(out).max())


def test_paper_variant_converts_to_scanned_layout():
    # XL-sized layouts are scanned by default ("auto" from depth 12): S/8 has 12 blocks
    ref = TorchDiT(input_size=32, p=8, c=4, d=384, depth=12, heads=6, num_classes=1000)
    params = convert_dit_state_dict(numpy_state(ref), "S/8", scan_blocks=True)
    model = DiT.from_variant("S/8", input_size=32, in_channels=4, num_classes=1000,
                             learn_sigma=True, scan_blocks=True)
    expect = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, expect)
