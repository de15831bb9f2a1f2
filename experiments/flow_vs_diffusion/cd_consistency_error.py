"""How far a consistency-distilled student is from its own target, noise level by level.

    python -m experiments.flow_vs_diffusion.cd_consistency_error \
        --workdir runs/cd_default --steps 1000,2000 --num 512

Consistency distillation trains f(x_{n+1}, sigma_{n+1}) towards the target network at
x_n, one Heun step of the teacher's probability-flow ODE away, on N Karras levels. At
convergence f maps every point of such a discretised teacher trajectory to the
trajectory's end. This tool solves the raw teacher's ODE on the student's own grid (its
consistency.num_scales levels, one Heun step per pair, as in training) from
x_{N-1} = sigma_max z down to sigma_min, and reports at each level sigma_n the RMS
distance (per pixel, images in [-1, 1]) from the trajectory's end x_0 of

  - the student's f(x_n, sigma_n), at each checkpoint in --steps, and
  - the teacher's one-step denoiser D(x_n, sigma_n), which is where a student started
    from the teacher (consistency.init_from_teacher) begins.

Both without the sampling-only x0 clipping of their configs (`raw_teacher`), as the
distillation loss sees them.

With --steps empty only the newest checkpoint is read. n = --num trajectories (seed
--seed), 95 % bootstrap intervals over trajectories. Writes OUT/cd_consistency_error.csv
and .md.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffusion import cli, pretrained
from diffusion.consistency import bridge
from diffusion.consistency import losses as cm
from diffusion.objectives.consistency import raw_teacher
from diffusion.objectives.consistency_config import section
from diffusion.train.setup import load_teacher

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("model", "step", "n", "sigma", "num", "rms", "rms_lo", "rms_hi")

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "the consistency-distillation run", flag_values=FLAGS)
flags.DEFINE_string("steps", "", "student checkpoints to read (comma-separated; default: "
                    "the newest)", flag_values=FLAGS)
flags.DEFINE_integer("num", 512, "teacher trajectories", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "trajectories per call", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the trajectories' start noise", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples", flag_values=FLAGS)
flags.DEFINE_string("out", HERE, "output directory", flag_values=FLAGS)


def trajectories(teacher, sigmas: np.ndarray, num: int, batch: int, seed: int) -> np.ndarray:
    """[N, num, H, W, C]: the teacher's Heun solve on the ascending grid `sigmas`, row n
    at sigmas[n] (row N-1 the start sigma_max z, row 0 the end at sigma_min)."""
    den_of = lambda p: teacher.objective.denoiser(teacher, p)

    @jax.jit
    def solve(params, z):
        d = lambda x, s: bridge.sigma_space_x0(den_of(params), x, s)
        x = jnp.float32(sigmas[-1]) * z
        rows = [x]
        for n in range(len(sigmas) - 2, -1, -1):
            s_hi = jnp.full((z.shape[0],), sigmas[n + 1], jnp.float32)
            s_lo = jnp.full((z.shape[0],), sigmas[n], jnp.float32)
            x = cm.heun_step(d, x, s_hi, s_lo)
            rows.append(x)
        return jnp.stack(rows[::-1])

    out = []
    for i, start in enumerate(range(0, num, batch)):
        b = min(batch, num - start)
        z = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),
                              (b,) + tuple(teacher.image_shape), jnp.float32)
        out.append(np.asarray(solve(teacher.params, z)))
    return np.concatenate(out, axis=1)


def x0_at_levels(pipe, traj: np.ndarray, sigmas: np.ndarray, batch: int) -> np.ndarray:
    """[N, num, H, W, C]: the pipeline's x0 (for a consistency run: f) at each row's level."""
    den_of = lambda p: pipe.objective.denoiser(pipe, p)
    fn = jax.jit(lambda p, x, s: bridge.sigma_space_x0(den_of(p), x, s))
    out = np.empty_like(traj)
    for n, s in enumerate(sigmas):
        for start in range(0, traj.shape[1], batch):
            x = traj[n, start:start + batch]
            out[n, start:start + batch] = np.asarray(
                fn(pipe.params, jnp.asarray(x), jnp.full((x.shape[0],), s, jnp.float32)))
    return out


def rms_rows(model: str, step, pred: np.ndarray, end: np.ndarray, sigmas: np.ndarray,
             resamples: int, seed: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(seed)
    for n, s in enumerate(sigmas):
        per = np.sqrt(np.mean(np.square(pred[n] - end), axis=(1, 2, 3)))  # [num]
        idx = rng.integers(0, per.size, (resamples, per.size))
        boot = per[idx].mean(axis=1)
        rows.append(dict(model=model, step=step, n=n, sigma=float(s), num=per.size,
                         rms=float(per.mean()), rms_lo=float(np.percentile(boot, 2.5)),
                         rms_hi=float(np.percentile(boot, 97.5))))
    return rows


def write_tables(rows: list[dict], out: str, workdir: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cd_consistency_error.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    models = list(dict.fromkeys((r["model"], r["step"]) for r in rows))
    by = {(r["model"], r["step"], r["n"]): r for r in rows}
    head = ["n", "sigma"] + [f"{m} @ {s}" if s != "" else m for m, s in models]
    lines = [f"# Distance to the teacher trajectory's end, per noise level ({workdir})", "",
             f"RMS per pixel over n = {rows[0]['num']} trajectories, 95 % bootstrap "
             "interval; images in [-1, 1].", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in sorted({r["n"] for r in rows}, reverse=True):
        cells = [str(n), f"{by[models[0] + (n,)]['sigma']:.4g}"]
        for m in models:
            r = by[m + (n,)]
            cells.append(f"{r['rms']:.3f} [{r['rms_lo']:.3f}, {r['rms_hi']:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out, "cd_consistency_error.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    student = pretrained.load(FLAGS.workdir, restore=False)
    s = section(student.config)
    if student.config.train.objective != "consistency_distillation":
        raise app.UsageError(f"{FLAGS.workdir} was trained by "
                             f"{student.config.train.objective!r}, not consistency "
                             "distillation")
    # The trainer's own teacher loader: its checks and error messages, its image shape.
    teacher = raw_teacher(load_teacher(student.config, student.image_shape,
                                       list(student.mesh.devices.flat)).restore())
    sigmas = bridge.karras_grid(int(s.num_scales), float(s.sigma_min), float(s.sigma_max),
                                float(s.rho))
    traj = trajectories(teacher, sigmas, FLAGS.num, FLAGS.batch_size, FLAGS.seed)
    end = traj[0]
    rows = rms_rows("teacher D", "", x0_at_levels(teacher, traj, sigmas, FLAGS.batch_size),
                    end, sigmas, FLAGS.bootstrap, FLAGS.seed)
    steps = [int(x) for x in FLAGS.steps.split(",") if x] or [None]
    for step in steps:
        pipe = raw_teacher(student.restore(step))  # f unclipped, as the loss sees it
        rows += rms_rows("student f", pipe.step, x0_at_levels(pipe, traj, sigmas,
                                                                FLAGS.batch_size),
                         end, sigmas, FLAGS.bootstrap, FLAGS.seed)
        print(f"step {pipe.step}: " + ", ".join(f"{r['sigma']:.3g}: {r['rms']:.3f}"
                                                for r in rows[-len(sigmas):]), flush=True)
    write_tables(rows, FLAGS.out, FLAGS.workdir)
    print(f"wrote {os.path.join(FLAGS.out, 'cd_consistency_error.md')}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
