"""experiments/flow_vs_diffusion: the tables it writes from the per-model fid_table
results (no sampling: the fid_table tool has its own tests)."""
import csv

import pytest
from absl import app

from experiments.flow_vs_diffusion import run as study

HEADER = "sampler,options,nfe,num_samples,fid,fid_lo,fid_hi,is,precision,recall\n"


def _table(path, rows):
    path.write_text(HEADER + "".join(f"{s},,{n},100,{f},{lo},{hi},1,0.5,0.5\n"
                                     for s, n, f, lo, hi in rows))
    return str(path)


def test_results_combine_the_models_and_claim_only_disjoint_differences(tmp_path):
    tables = {
        "diffusion": _table(tmp_path / "d.csv", [("ddim", 1, 300, 290, 310),
                                                 ("ddim", 2, 120, 110, 130),
                                                 ("ddim", 50, 10, 9, 11)]),
        "flow": _table(tmp_path / "f.csv", [("flow_euler", 1, 200, 190, 210),
                                            ("flow_euler", 2, 125, 115, 135)]),
        "cd": _table(tmp_path / "c.csv", [("consistency", 2, 25, 23, 27)]),
    }
    rows = study.collect(tables)
    assert {r["model"] for r in rows} == set(tables) and len(rows) == 6
    study.write(str(tmp_path), rows, {m: f"runs/{m}" for m in tables}, 100)
    with open(tmp_path / "results.csv") as f:
        out = list(csv.DictReader(f))
    assert tuple(out[0]) == study.COLUMNS and len(out) == 6
    md = (tmp_path / "results.md").read_text()
    assert ("| diffusion | ddim | 300.00 [290.00, 310.00] | 120.00 [110.00, 130.00] | "
            "10.00 [9.00, 11.00] |") in md
    assert "| flow | flow_euler | 200.00 [190.00, 210.00] | 125.00 [115.00, 135.00] |  |" in md
    lines = study.few_step_lines(rows)
    assert any("at 1 NFE" in l and "lower, intervals disjoint" in l for l in lines)
    assert any("at 2 NFE" in l and "no difference claimed" in l and "flow" in l for l in lines)
    assert any("ratio 2.50 (target <= 2: not met)" in l for l in lines)
    for interval, verdict in (((1.8, 1.6, 1.98), "met"), ((1.9, 1.7, 2.1), "not decided"),
                              ((2.5, 2.2, 2.8), "not met")):
        line = study.few_step_lines(rows, interval)[-1]
        assert f"ratio {interval[0]:.2f} [{interval[1]:.2f}, {interval[2]:.2f}]" in line
        assert f"(target <= 2: {verdict}" in line, line


def test_cd_ratio_interval_from_the_cached_features(tmp_path):
    """The ratio line's interval comes from the features fid_table cached for the CD
    student's 2-step row and the teacher's DDIM-50 row, against the CD run's reference
    statistics; without them there is none."""
    import numpy as np

    from diffusion.evaluation import frechet
    rng = np.random.default_rng(1)
    run = tmp_path / "cd_run"
    run.mkdir()
    assert study.cd_ratio_interval(str(tmp_path), str(run), 300) is None
    frechet.save_stats(str(run / "ref_stats_classifier_test_8x8.npz"), np.zeros(3), np.eye(3))
    feats = {"cd": ("consistency_steps2", rng.normal(1.0, 1.0, (300, 3))),
             "diffusion": ("ddim_steps50", rng.normal(0.5, 1.0, (300, 3)))}
    for model, (name, f) in feats.items():
        (tmp_path / "tables" / model / "features").mkdir(parents=True)
        np.savez(tmp_path / "tables" / model / "features" / f"{name}_n300_seed0.npz",
                 features=f)
    ratio, lo, hi = study.cd_ratio_interval(str(tmp_path), str(run), 300)
    fids = [frechet.frechet_distance(*frechet.stats_from_features(feats[m][1]),
                                     np.zeros(3), np.eye(3)) for m in ("cd", "diffusion")]
    assert ratio == pytest.approx(fids[0] / fids[1]) and lo < ratio < hi
    assert study.cd_ratio_interval(str(tmp_path), str(run), 2000) is None  # other n


def test_reuse_takes_a_models_earlier_table_and_measures_only_the_others(tmp_path,
                                                                        monkeypatch):
    """--reuse: one retrained model is re-measured while the others keep the rows an
    earlier run wrote (no fid_table process is started for them)."""
    folder = tmp_path / "tables" / "diffusion"
    folder.mkdir(parents=True)
    _table(folder / "results.csv", [("ddim", 50, 10, 9, 11)])
    started = []

    def fake_run(cmd, check):
        started.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out="))
        (tmp_path / "tables" / "cd").mkdir(parents=True, exist_ok=True)
        _table(tmp_path / "tables" / "cd" / "results.csv", [("consistency", 2, 19, 18, 20)])
        assert out == str(tmp_path / "tables" / "cd")
    monkeypatch.setattr(study.subprocess, "run", fake_run)
    rows = study.main(["prog", "--diffusion=runs/d", "--cd=runs/c", "--reuse=diffusion",
                       f"--out={tmp_path}", "--num_samples=100"])
    assert len(started) == 1 and any("--workdir=runs/c" == a for a in started[0])
    assert {(r["model"], r["fid"]) for r in rows} == {("diffusion", 10.0), ("cd", 19.0)}
    md = (tmp_path / "results.md").read_text()
    assert "`runs/d`" in md and "ratio 1.90 (target <= 2: met)" in md
    with pytest.raises(app.UsageError, match="--reuse names \\['flow'\\]"):
        study.main(["prog", "--cd=runs/c", "--reuse=flow", f"--out={tmp_path}"])
    with pytest.raises(app.UsageError, match="tables/cd/results.csv does not exist"):
        study.main(["prog", "--cd=runs/c", "--reuse=cd", f"--out={tmp_path / 'new'}"])


def test_cd_consistency_error_walks_the_teacher_ode_and_scores_each_level(
        tiny_default_run, tmp_path):
    """The teacher trajectory is one Heun step per pair from sigma_max z down the grid,
    and each level's RMS is the mean over trajectories of the per-image RMS distance."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffusion import pretrained
    from diffusion.consistency import bridge
    from diffusion.consistency import losses as cm
    from diffusion.objectives.consistency import raw_teacher
    from experiments.flow_vs_diffusion import cd_consistency_error as tool

    teacher = raw_teacher(pretrained.load(tiny_default_run))
    sigmas = bridge.karras_grid(3, 0.002, 80.0, 7.0)
    traj = tool.trajectories(teacher, sigmas, num=4, batch=2, seed=0)
    assert traj.shape == (3, 4) + teacher.image_shape
    z = jax.random.normal(jax.random.fold_in(jax.random.key(0), 1), (2,) + teacher.image_shape)
    np.testing.assert_allclose(traj[2, 2:], 80.0 * np.asarray(z), rtol=1e-6)  # 2nd batch
    den = teacher.objective.denoiser(teacher, teacher.params)
    d = lambda x, s: bridge.sigma_space_x0(den, x, s)
    step = jax.jit(lambda x: cm.heun_step(d, x, jnp.full((2,), sigmas[2], jnp.float32),
                                          jnp.full((2,), sigmas[1], jnp.float32)))
    np.testing.assert_allclose(traj[1, 2:], np.asarray(step(jnp.asarray(traj[2, 2:]))),
                               rtol=1e-4, atol=1e-4)

    end = np.zeros((4, 2, 2, 1), np.float32)
    pred = np.stack([end, end + np.array([1.0, 1.0, 3.0, 3.0])[:, None, None, None]])
    rows = tool.rms_rows("m", 7, pred, end, np.array([0.002, 80.0]), resamples=200, seed=0)
    assert [r["rms"] for r in rows] == [0.0, 2.0]
    assert rows[1]["rms_lo"] <= 2.0 <= rows[1]["rms_hi"] and rows[1]["num"] == 4
    tool.write_tables(rows, str(tmp_path), "runs/x")
    md = (tmp_path / "cd_consistency_error.md").read_text()
    assert "| 1 | 80 | 2.000 [" in md and "| 0 | 0.002 | 0.000 [0.000, 0.000] |" in md


def test_fid_ratio_interval_carries_both_sample_sets(tmp_path):
    """fid_ratio: the point ratio is FID_A / FID_B exactly; two draws of one distribution
    give an interval around 1, a clearly worse A one above 1; the CLI prints it."""
    import os
    import subprocess
    import sys

    import numpy as np

    from diffusion.evaluation import frechet
    from experiments.flow_vs_diffusion import fid_ratio
    rng = np.random.default_rng(0)
    d = 4
    mu, cov = np.zeros(d), np.eye(d)
    same_a, same_b = (rng.normal(0.5, 1.0, (400, d)) for _ in range(2))
    worse = rng.normal(1.0, 1.0, (400, d))
    exact = [frechet.frechet_distance(*frechet.stats_from_features(f), mu, cov)
             for f in (worse, same_b)]
    ratio, lo, hi = frechet.bootstrap_fid_ratio(worse, same_b, mu, cov, 100)
    assert ratio == pytest.approx(exact[0] / exact[1], rel=1e-12)
    assert 1.0 < lo < ratio < hi  # FID ~4 (mean 1 in 4 dims) against ~1 (mean 0.5)
    _, lo, hi = frechet.bootstrap_fid_ratio(same_a, same_b, mu, cov, 100)
    assert lo < 1.0 < hi
    for name, f in (("a", worse), ("b", same_b)):
        np.savez(tmp_path / f"{name}.npz", features=f)
    frechet.save_stats(str(tmp_path / "ref.npz"), mu, cov)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.flow_vs_diffusion.fid_ratio",
         f"--a={tmp_path / 'a.npz'}", f"--b={tmp_path / 'b.npz'}",
         f"--reference={tmp_path / 'ref.npz'}", "--bootstrap=50"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"A / B {exact[0] / exact[1]:.3f} [" in out.stdout
    with pytest.raises(app.UsageError, match="--reference is required"):
        fid_ratio.main(["fid_ratio", "--a=x", "--b=y"])
