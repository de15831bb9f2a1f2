"""Sample and statistics files in the ADM / DiT layout, and `python -m
diffusion.evaluation.fid A.npz B.npz` (run in-process on small synthetic files)."""
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import evaluation as ev
from diffusion.evaluation import fid, sample_files
from diffusion.evaluation.classifier import DEFAULT_WEIGHTS


def _images(seed, n=24, shape=(28, 28, 1)):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def _printed(capsys, name):
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(name)]
    assert len(lines) == 1, lines
    return float(lines[0].split(":")[1])


def test_sample_files_use_the_adm_layout(tmp_path):
    x = _images(0, 4)
    sample_files.save_samples(str(tmp_path / "cond.npz"), x, np.arange(4))
    with np.load(tmp_path / "cond.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"] and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], x)
    sample_files.save_samples(str(tmp_path / "uncond.npz"), x)
    with np.load(tmp_path / "uncond.npz") as f:
        assert f.files == ["arr_0"]
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, C\]"):
        sample_files.save_samples(str(tmp_path / "bad.npz"), x.astype(np.float32))


def test_stats_files_write_mu_sigma_and_read_cov_too(tmp_path):
    mu, cov = np.arange(3.0), np.eye(3) * 2
    ev.save_stats(str(tmp_path / "s.npz"), mu, cov)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"]
    got = ev.load_stats(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(got["sigma"], cov)
    np.testing.assert_array_equal(got["cov"], cov)
    np.savez(tmp_path / "old.npz", mu=mu, cov=cov)  # the layout written before
    np.testing.assert_array_equal(ev.load_stats(str(tmp_path / "old.npz"))["sigma"], cov)
    np.savez(tmp_path / "none.npz", mu=mu)
    with pytest.raises(ValueError, match="no 'sigma' .or 'cov'. array"):
        ev.load_stats(str(tmp_path / "none.npz"))


def test_fid_tool_prints_frechet_of_classifier_features(tmp_path, capsys):
    a, b = _images(1), _images(2)
    np.savez(tmp_path / "a.npz", arr_0=a, arr_1=np.arange(len(a)))
    np.savez(tmp_path / "b.npz", arr_0=b)
    fid.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
              f"--save_stats={tmp_path / 'a_stats.npz'}"])
    net = ev.classifier_features(DEFAULT_WEIGHTS)
    feats = [np.asarray(net(jnp.asarray(x, jnp.float32) / 127.5 - 1.0)["pool"]) for x in (a, b)]
    stats = [ev.stats_from_features(f) for f in feats]
    want = ev.frechet_distance(*stats[0], *stats[1])
    assert _printed(capsys, "FID") == pytest.approx(want, rel=1e-4)
    # ... and the reference's statistics file stands in for its images (as ADM's do).
    with np.load(tmp_path / "a_stats.npz") as f:
        assert {"mu", "sigma"} <= set(f.files)
    fid.main(["fid", str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz")])
    assert _printed(capsys, "FID") == pytest.approx(want, rel=1e-4)
    with pytest.raises(SystemExit, match="--metrics needs images, and .*a_stats.npz holds only"):
        fid.main(["fid", str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz"), "--metrics"])
    with pytest.raises(ValueError, match="statistics of 'classifier' features, not 'inception'"):
        fid.file_stats(str(tmp_path / "a_stats.npz"), type("N", (), {"name": "inception"}), 8)


def test_fid_tool_metrics_and_other_sizes(tmp_path, capsys):
    # 8x8 RGB samples are resized to the classifier's 28x28x1, as in training evaluation.
    np.savez(tmp_path / "a.npz", arr_0=_images(3, 16, (8, 8, 3)))
    np.savez(tmp_path / "b.npz", arr_0=_images(4, 16, (8, 8, 3)))
    fid.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--metrics"])
    out = capsys.readouterr().out
    for name in ("FID:", "Inception Score:", "Precision:", "Recall:"):
        assert name in out, out


def test_fid_tool_rejects_bad_inputs_in_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    np.savez(tmp_path / "a.npz", arr_0=_images(5, 4))
    with pytest.raises(ValueError, match=r"x\.npz holds neither images .arr_0. nor statistics"):
        sample_files.load_batch(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"f\.npz: arr_0 must be uint8 images \[N, H, W, C\]"):
        sample_files.load_batch(str(tmp_path / "f.npz"))
    with pytest.raises(SystemExit, match="inception_weights"):
        fid.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                  "--features=inception"])
    with pytest.raises(SystemExit, match="two files"):
        fid.main(["fid", str(tmp_path / "a.npz")])
