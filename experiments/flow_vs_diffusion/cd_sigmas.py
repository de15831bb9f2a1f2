"""The intermediate noise level of 2-step consistency sampling, chosen by a sweep.

    python -m experiments.flow_vs_diffusion.cd_sigmas --workdir runs/cd_default \
        --sigmas 0.2,0.5,1,2,2.5,5,10,20 --num_samples 1000 --final_samples 2000

Two-step consistency sampling denoises pure noise once, re-noises the result to one
intermediate sigma and denoises again. Song et al. (2023) pick that sigma by a search
against FID; the sampler's default here is the middle of a 3-point Karras grid (2.51
for sigma in [0.002, 80]). This measures FID (shipped classifier features, 95 %
bootstrap) for each sigma of the sweep on `num_samples` samples drawn with seed 1, then
re-measures the best one and the default with seed 0 and `final_samples` samples, the
seed and n of experiments/flow_vs_diffusion/results.csv, so that the number reported
is not the one the choice was made on. Writes OUT/cd_sigmas.csv and OUT/cd_sigmas.md.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

from absl import app, flags

from diffusion import cli
from diffusion.evaluation import frechet
from diffusion.samplers import consistency

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("stage", "sigma", "seed", "num_samples", "fid", "fid_lo", "fid_hi")

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "the consistency run", flag_values=FLAGS)
flags.DEFINE_string("sigmas", "0.2,0.5,1,2,2.5,5,10,20", "intermediate sigmas to try",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1000, "samples per sweep row (seed 1)", flag_values=FLAGS)
flags.DEFINE_integer("final_samples", 2000, "samples of the final rows (seed 0)",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 500, "images per sampling call", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples", flag_values=FLAGS)
flags.DEFINE_string("out", HERE, "output directory", flag_values=FLAGS)


def default_sigma(bench) -> float:
    """The sampler's own 2-step intermediate sigma for this run's schedule."""
    return float(consistency.resolve_sigmas(bench.run.objective.denoiser(
        bench.run, bench.params).schedule, 2)[2][0])


def main(argv: Sequence[str]) -> None:
    from experiments.sampler_benchmark.fid_table import Bench
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    bench = Bench(FLAGS.workdir, FLAGS.batch_size)
    ref = bench.ref

    def row(stage, sigma, seed, n):
        feats, _, _ = bench.features("consistency", bench.options(
            "consistency", {"sigmas": (sigma,)}), 2, n, seed)
        fid, lo, hi = frechet.bootstrap_fid(feats, ref["mu"], ref["cov"], FLAGS.bootstrap)
        r = dict(stage=stage, sigma=sigma, seed=seed, num_samples=n, fid=fid, fid_lo=lo,
                 fid_hi=hi)
        print(r, flush=True)
        return r

    sweep = [row("sweep", float(s), 1, FLAGS.num_samples) for s in FLAGS.sigmas.split(",")]
    best = min(sweep, key=lambda r: r["fid"])["sigma"]
    default = default_sigma(bench)
    final = [row("final (best of sweep)", best, 0, FLAGS.final_samples),
             row("final (sampler default)", default, 0, FLAGS.final_samples)]
    rows = sweep + final
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "cd_sigmas.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    command = ("python -m experiments.flow_vs_diffusion.cd_sigmas "
               + " ".join(a for a in argv[1:] if not a.startswith("--out")))
    lines = ["# 2-step consistency sampling: the intermediate sigma", "",
             "```", command, "```", "",
             f"Run: `{FLAGS.workdir}` (step {bench.step}). FID in the shipped classifier's "
             "features, 95 % bootstrap intervals over the samples.", "",
             "| stage | sigma | seed | n | FID | 95 % interval |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['stage']} | {r['sigma']:.3g} | {r['seed']} | {r['num_samples']} | "
              f"{r['fid']:.2f} | [{r['fid_lo']:.2f}, {r['fid_hi']:.2f}] |" for r in rows]
    with open(os.path.join(FLAGS.out, "cd_sigmas.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.run(main, FLAGS)
