"""Tests of the evaluation metrics and feature networks (CPU, synthetic data, < 60 s)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from diffusion import evaluation as ev
from diffusion.evaluation import inception_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "diffusion", "evaluation", "assets", "fmnist_classifier.msgpack")


# ---- Fréchet distance -----------------------------------------------------------------

def _diag_closed_form(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.2, 3.0, 5), rng.uniform(0.2, 3.0, 5)
    got = ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(_diag_closed_form(mu1, s1, mu2, s2), rel=1e-9)
    assert ev.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1), method=method) < 1e-9


def test_frechet_distance_methods_agree_on_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu = np.zeros(6)
    d_eigh = ev.frechet_distance(mu, c1, mu, c2, method="eigh")
    d_sqrtm = ev.frechet_distance(mu, c1, mu, c2, method="sqrtm")
    assert d_eigh == pytest.approx(d_sqrtm, rel=1e-6)
    # Rotating one covariance changes the distance (not just the traces): the cross term
    # matters, so a trace-only implementation would fail here.
    assert d_eigh > 0.1
    with pytest.raises(ValueError, match="shape mismatch"):
        ev.frechet_distance(mu, c1, np.zeros(5), c2)


def test_frechet_distance_from_20k_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.5])
    s1, s2 = np.array([1.0, 0.5, 2.0, 1.0]), np.array([0.3, 1.5, 2.0, 0.7])
    x1 = mu1 + np.sqrt(s1) * rng.normal(size=(20_000, 4))
    x2 = mu2 + np.sqrt(s2) * rng.normal(size=(20_000, 4))
    est = ev.frechet_distance(*ev.stats_from_features(x1), *ev.stats_from_features(x2))
    exact = _diag_closed_form(mu1, s1, mu2, s2)
    assert est == pytest.approx(exact, abs=0.05)


def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(517, 8)) * rng.uniform(0.1, 5, 8) + 100.0  # large offset
    stats = ev.FeatureStats(8)
    for start, stop in [(0, 1), (1, 64), (64, 300), (300, 517)]:  # uneven batches
        stats.update(x[start:stop].astype(np.float32))
    mu, cov = ev.stats_from_features(x.astype(np.float32))
    assert stats.count == 517
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-4, atol=1e-5)
    # Merging two accumulators equals accumulating everything in one.
    a, b = ev.FeatureStats(8), ev.FeatureStats(8)
    a.update(x[:200].astype(np.float32))
    b.update(x[200:].astype(np.float32))
    a.merge(b)
    np.testing.assert_allclose(a.cov, cov, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        stats.update(np.zeros((3, 7)))


# ---- Inception Score, precision / recall ----------------------------------------------

def test_inception_score_bounds():
    k = 7
    assert ev.inception_score(np.full((70, k), 1.0 / k), num_splits=5)[0] == pytest.approx(1.0)
    one_hot = np.tile(np.eye(k), (4, 1))  # every split of 7 rows holds each class once
    mean, std = ev.inception_score(one_hot, num_splits=4)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    # Confident but all the same class: no diversity, score 1.
    assert ev.inception_score(np.tile(np.eye(k)[:1], (20, 1)), 2)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="softmax"):
        ev.inception_score(np.ones((10, k)), 2)


def test_precision_recall_identical_disjoint_and_half():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    assert ev.precision_recall(real, real, k=3) == (1.0, 1.0)
    far = real + 1000.0
    assert ev.precision_recall(real, far, k=3) == (0.0, 0.0)
    # Half the generated points are real points, half are far away: precision 1/2.
    fake = np.concatenate([real[:150], far[150:]])
    precision, _ = ev.precision_recall(real, fake, k=3, block_size=64)
    assert precision == pytest.approx(0.5)


# ---- Inception-v3 ---------------------------------------------------------------------

def random_pytorch_fid_state_dict(seed: int = 0) -> dict:
    """Random weights in pytorch-fid's layout, reproducible from numpy alone."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in sorted(inception_weights.pytorch_fid_state_dict_shapes().items()):
        if key.endswith("conv.weight") or key == "fc.weight":
            v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            v = rng.uniform(0.5, 1.5, shape)
        else:
            v = rng.normal(size=shape) * 0.1
        sd[key] = v.astype(np.float32)
    return sd


# pytorch-fid's forward pass (torchvision Inception3 with FIDInceptionA/C/E_1/E_2, resize
# to 299 with F.interpolate, then fc) run in torch 2.13 on random_pytorch_fid_state_dict(0)
# and the input of test_inception_matches_torch_reference: the first values and row sums.
TORCH_POOL_HEAD = [[1.225294, 7.619555, 4.115311, 17.615501, 22.568495, 4.967439],
                   [1.091824, 7.646679, 4.054867, 18.485384, 23.283548, 4.953613]]
TORCH_LOGITS_HEAD = [[2.609404, 11.114706, 5.26638, 4.017848, -14.41924, 3.224295],
                     [2.90178, 11.669509, 5.367138, 4.095344, -14.731357, 3.539162]]
TORCH_POOL_SUM = [8009.968736, 8267.667614]
TORCH_LOGITS_SUM = [204.998363, 219.666815]


def torch_reference_input() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (2, 40, 37, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
    sd = random_pytorch_fid_state_dict(0)
    sd.update({k.replace("running_var", "num_batches_tracked"): np.array(0)
               for k in sd if k.endswith("running_var")})  # real .pth files carry these
    path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
    np.savez(path, **sd)
    return path


def test_convert_inception_from_torch_file(tmp_path):
    # The converter is the one place that needs torch (optional, not in requirements).
    torch = pytest.importorskip("torch")
    from diffusion.evaluation import convert_inception
    sd = {k: torch.from_numpy(v) for k, v in random_pytorch_fid_state_dict(0).items()}
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    pth, npz = str(tmp_path / "pt_inception.pth"), str(tmp_path / "inception_fid.npz")
    torch.save(sd, pth)
    assert convert_inception.convert(pth, npz) == 94 * 5 + 2
    loaded = ev.load_inception_weights(npz)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
    del sd["fc.bias"]
    torch.save(sd, pth)
    with pytest.raises(ValueError, match="fc.bias"):
        convert_inception.convert(pth, npz)


def test_inception_variables_cover_the_pytorch_fid_layout():
    shapes = jax.eval_shape(ev.InceptionV3FID(resize_to=75).init, jax.random.key(0),
                            jnp.zeros((1, 75, 75, 3)))
    from_module = inception_weights.variables_to_state_dict_keys(shapes)
    documented = ev.pytorch_fid_state_dict_shapes()
    assert len(documented) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 bn arrays) and fc
    assert from_module == documented
    # ...and the loader builds exactly the module's variable tree.
    loaded = ev.state_dict_to_variables(random_pytorch_fid_state_dict(0))
    got = jax.tree_util.tree_map(lambda a: a.shape, loaded)
    want = jax.tree_util.tree_map(lambda a: a.shape, shapes)
    assert got == want


def test_state_dict_errors_name_the_key():
    sd = random_pytorch_fid_state_dict(0)
    del sd["Mixed_6b.branch7x7_2.bn.running_mean"]
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.bn.running_mean"):
        ev.state_dict_to_variables(sd)
    sd = random_pytorch_fid_state_dict(0)
    sd["fc.weight"] = sd["fc.weight"].T
    with pytest.raises(ValueError, match="fc.weight"):
        ev.state_dict_to_variables(sd)
    with pytest.raises(ValueError, match="convert_inception"):
        ev.load_inception_weights("pt_inception-2015-12-05-6726825d.pth")


def test_torch_conv_layout_conversion():
    # A torch conv weight [O, I, kh, kw] applied in NCHW must equal our converted NHWC conv.
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3, 1, 3)).astype(np.float32)  # asymmetric kernel catches flips
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    ref = jax.lax.conv_general_dilated(np.transpose(x, (0, 3, 1, 2)), w, (1, 1),
                                       ((0, 0), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    sd = random_pytorch_fid_state_dict(0)
    sd["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 1, 3), np.float32)
    sd["Mixed_7b.branch3x3_2a.conv.weight"][:4, :3] = w
    kernel = ev.state_dict_to_variables(sd)["params"]["Mixed_7b"]["branch3x3_2a"]["conv"]["kernel"]
    conv = jax.lax.conv_general_dilated(x, kernel[:, :, :3, :4], (1, 1), ((0, 0), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.transpose(ref, (0, 2, 3, 1)), conv, rtol=1e-5, atol=1e-5)


def test_inception_loads_converted_file_and_matches_torch_reference(inception_npz):
    net = ev.inception_features(inception_npz, resize_to=299)
    assert net.name == "inception"
    with jax.default_matmul_precision("highest"):
        out = jax.device_get(net(jnp.asarray(torch_reference_input())))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    np.testing.assert_allclose(out["pool"][:, :6], TORCH_POOL_HEAD, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"][:, :6], TORCH_LOGITS_HEAD, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["pool"].sum(1), TORCH_POOL_SUM, rtol=1e-4)
    np.testing.assert_allclose(out["logits"].sum(1), TORCH_LOGITS_SUM, rtol=1e-4)


def test_inception_small_input_grey_and_errors():
    model = ev.InceptionV3FID(resize_to=75)
    variables = ev.state_dict_to_variables(random_pytorch_fid_state_dict(0))
    out = jax.jit(model.apply)(variables, jnp.zeros((1, 28, 28, 1)))
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert np.all(np.isfinite(out["pool"]))
    with pytest.raises(ValueError, match="minimum input size 75"):
        ev.InceptionV3FID(resize_to=64).apply(variables, jnp.zeros((1, 28, 28, 3)))
    with pytest.raises(ValueError, match="1 or 3"):
        model.apply(variables, jnp.zeros((1, 28, 28, 2)))


# ---- classifier and evaluate_samples --------------------------------------------------

def test_classifier_shapes_and_roundtrip(tmp_path):
    model = ev.SmallClassifier()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    out = jax.jit(model.apply)({"params": params}, jnp.zeros((3, 28, 28, 1)))
    assert out["pool"].shape == (3, 128) and out["logits"].shape == (3, 10)
    path = str(tmp_path / "clf.msgpack")
    ev.save_classifier(path, params)
    net = ev.classifier_features(path)
    np.testing.assert_allclose(net(jnp.zeros((3, 28, 28, 1)))["pool"], out["pool"], atol=1e-6)
    with pytest.raises(ValueError, match="28, 28, 1"):
        model.apply({"params": params}, jnp.zeros((3, 32, 32, 3)))
    with pytest.raises(ValueError, match="does not hold SmallClassifier"):
        ev.load_classifier(path, ev.SmallClassifier(feature_dim=64))


def test_shipped_classifier_classifies_fashion_mnist():
    from diffusion.data import make_source
    assert os.path.getsize(ASSET) < 2_000_000
    data = make_source("fashion_mnist_idx", split="test").get(np.arange(1000))
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    logits = ev.classifier_features(ASSET)(jnp.asarray(images))["logits"]
    assert np.mean(np.argmax(logits, -1) == data["label"]) > 0.85


def test_evaluate_samples_and_reference_cache(tmp_path):
    model = ev.SmallClassifier()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    net = ev.FeatureNetwork("classifier", model.apply, variables)
    rng = np.random.default_rng(6)
    real = rng.uniform(-1, 1, (300, 28, 28, 1)).astype(np.float32)
    cache = str(tmp_path / "ref.npz")
    batches = [dict(image=real[i:i + 64], label=np.zeros(64, np.int32))
               for i in range(0, 300, 64)]
    ref = ev.reference_stats(net, batches, cache)
    assert ref["num_samples"] == 300 and os.path.exists(cache)
    cached = ev.reference_stats(net, iter(()), cache)  # read back, data not touched
    np.testing.assert_allclose(cached["cov"], ref["cov"])
    with pytest.raises(ValueError, match="'inception'"):
        ev.reference_stats(ev.FeatureNetwork("inception", model.apply, variables), [], cache)

    same = ev.evaluate_samples(real, net, ref, batch_size=100)
    assert same["num_samples"] == 300
    assert same["fid_classifier@300"] < 1e-3
    assert same["precision_classifier@300"] == 1.0 and same["recall_classifier@300"] == 1.0
    assert 1.0 <= same["is_classifier@300"] <= 10.0
    # Blank images are far from noise: larger FID, no precision.
    blank = ev.evaluate_samples(np.full((200, 28, 28, 1), -1.0, np.float32), net, ref)
    assert blank["fid_classifier@200"] > 1.0 + 100 * same["fid_classifier@300"]
    assert blank["precision_classifier@200"] == 0.0
    # Sharding the batches over a mesh (every device here) changes nothing.
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Explicit,))
    sharded = ev.evaluate_samples(real[:250], net, ref, batch_size=100, mesh=mesh)
    plain = ev.evaluate_samples(real[:250], net, ref, batch_size=100)
    assert sharded["fid_classifier@250"] == pytest.approx(plain["fid_classifier@250"], rel=1e-5)
