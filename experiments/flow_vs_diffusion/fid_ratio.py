"""The ratio of two FIDs with a bootstrap interval over both sample sets.

    python -m experiments.flow_vs_diffusion.fid_ratio \
        --a runs/fid_cd/features/consistency_steps2_n2000_seed0.npz \
        --b runs/fid_teacher50/features/ddim_steps50_n2000_seed0.npz \
        --reference runs/cd/ref_stats_classifier_test_28x28.npz

A and B are feature files that experiments/sampler_benchmark/fid_table caches (OUT/
features/*.npz, key `features`); the reference is a statistics file with `mu` and `cov`
(the run's ref_stats_*.npz). Prints FID_A, FID_B and FID_A / FID_B [95 % interval]: the
CD criterion of experiments/flow_vs_diffusion ("the student at 2 steps within 2x its
teacher's FID") needs the noise of both FIDs, which their separate intervals do not give.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import app, flags

from diffusion import cli
from diffusion.evaluation import frechet

FLAGS = flags.FlagValues()
flags.DEFINE_string("a", None, "features of the numerator's samples (.npz)", flag_values=FLAGS)
flags.DEFINE_string("b", None, "features of the denominator's samples (.npz)",
                    flag_values=FLAGS)
flags.DEFINE_string("reference", None, "reference statistics (.npz with mu, cov)",
                    flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "bootstrap seed", flag_values=FLAGS)


def fid_ratio(a: str, b: str, reference: str, bootstrap: int = 200, seed: int = 0) -> dict:
    """{fid_a, fid_b, ratio, ratio_lo, ratio_hi, n_a, n_b} of two feature files."""
    ref = frechet.load_stats(reference)
    fa, fb = (np.load(p)["features"] for p in (a, b))
    ratio, lo, hi = frechet.bootstrap_fid_ratio(fa, fb, ref["mu"], ref["cov"], bootstrap,
                                                seed)
    fid_a, fid_b = (frechet.frechet_distance(*frechet.stats_from_features(f), ref["mu"],
                                             ref["cov"]) for f in (fa, fb))
    return dict(fid_a=fid_a, fid_b=fid_b, ratio=ratio, ratio_lo=lo, ratio_hi=hi,
                n_a=len(fa), n_b=len(fb))


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("a", "b", "reference"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    r = fid_ratio(FLAGS.a, FLAGS.b, FLAGS.reference, FLAGS.bootstrap, FLAGS.seed)
    print(f"FID A {r['fid_a']:.4g} (n = {r['n_a']}), FID B {r['fid_b']:.4g} (n = {r['n_b']}), "
          f"A / B {r['ratio']:.3f} [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}] "
          f"(95 % bootstrap over both sample sets, {FLAGS.bootstrap} resamples)")


if __name__ == "__main__":
    cli.run(main, FLAGS)
