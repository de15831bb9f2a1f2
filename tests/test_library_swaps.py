"""Library functions that replaced hand-written code give the hand-written results:
optax's tree norm and Polyak average (train step, EMA); the benchmark plots are
matplotlib's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion.train.state import ema_decay, ema_update


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)),
                     "bias": jax.random.normal(k2, (4,))},
            "dense": jax.random.normal(k3, (5, 7))}


def test_tree_norm_equals_hand_written_global_norm():
    g = _tree(jax.random.key(0))
    hand = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(optax.tree.norm(g)), hand, rtol=1e-6)


def test_ema_update_is_polyak_average_with_warmup_decay():
    ema, params = _tree(jax.random.key(1)), _tree(jax.random.key(2))
    for step, warmup in ((0, True), (5, True), (10_000, True), (3, False)):
        decay = ema_decay(jnp.asarray(step, jnp.int32), 0.999, warmup)
        want = (1 + step) / (10 + step) if warmup else 0.999
        np.testing.assert_allclose(float(decay), min(0.999, want), rtol=1e-6)
        out = ema_update(ema, params, decay)
        jax.tree.map(lambda o, e, p: np.testing.assert_allclose(
            o, float(decay) * e + (1 - float(decay)) * p, rtol=1e-5, atol=1e-6), out, ema, params)


# ---- sampler benchmark plots: matplotlib (Agg) --------------------------------------

def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_benchmark_plot_writes_a_png(tmp_path):
    from experiments.sampler_benchmark import report
    rows = [dict(sampler=s, nfe=n, target_nfe=n, fid=f, sw=float("nan") if n == 5 else f / 9)
            for s, k in (("ddim", 1.0), ("heun", 0.5)) for n, f in ((5, 40 * k), (10, 20 * k),
                                                                     (20, 9 * k))]
    path = tmp_path / "fid.png"
    report.plot(str(path), rows, [("fid", "FID vs NFE", True), ("sw", "sliced W2", False)],
                references={"fid": {"reference (1000 steps)": 3.0}}, title="tiny")
    assert _is_png(path) and path.stat().st_size > 5000
    # Nothing to draw: no file, no error (as before).
    report.plot(str(tmp_path / "none.png"), rows, [("missing", "x", False)])
    assert not (tmp_path / "none.png").exists()


def test_replot_redraws_a_shipped_result(tmp_path):
    import shutil
    from experiments.sampler_benchmark import run
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "sampler_benchmark", "gmm2d", "results.csv")
    shutil.copy(src, tmp_path / "results.csv")
    run.main(["--replot", str(tmp_path)])
    assert _is_png(tmp_path / "metrics.png")
