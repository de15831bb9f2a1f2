"""Sampler benchmark: samplers from the registry at several NFE, scored against exact
ground truth (a Gaussian mixture) or, for a trained checkpoint, with FID-style metrics.

    python -m experiments.sampler_benchmark.run --problem gmm2d --nfe 5,10,20,50 \
        --num_samples 4000 --out experiments/sampler_benchmark/gmm2d
    python -m experiments.sampler_benchmark.run --checkpoint WORKDIR \
        --samplers ddim,dpmpp_2m --nfe 10,20,50 --num_samples 1000

--samplers: comma-separated registry names, each optionally with options,
name:key=value[:key=value] (e.g. ddim:eta=1.0); "all" (default) = every registered
sampler. A sampler's steps are the most whose NFE (samplers.nfe with the sampler's
options, counted from its compiled plan) fits the target; the nfe column is that count,
which is below the target where no step count reaches it exactly.
Writes results.csv, results.md, metrics.png and TensorBoard scalars (tag
"<sampler>/<metric>", step = NFE) into --out.

Analytic problems (analytic_bench.py): exact ground truth on the default VP table or, with
--schedule flow, on the rectified-flow path (results_flow.*); every row has 95 %
bootstrap intervals. --compare DIR puts a problem's VP and flow results side by side at
equal NFE (path_compare.py: vp_vs_flow.md, vp_vs_flow.csv):

    python -m experiments.sampler_benchmark.run --problem smooth2d --schedule flow ...
    python -m experiments.sampler_benchmark.run --compare experiments/sampler_benchmark/smooth2d
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Sequence

from absl import app, flags

from diffusion import cli
from experiments.sampler_benchmark import analytic_bench, path_compare, report
from experiments.sampler_benchmark.specs import parse_ints, parse_samplers

# Default output directories of analytic problems: experiments/sampler_benchmark/<problem>.
_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("problem", None, "analytic problem: gmm2d, gmm_image, gaussian2d, "
                    "smooth2d", flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "workdir of a trained run", flag_values=FLAGS)
flags.DEFINE_string("replot", None, "redraw DIR/metrics*.png from DIR/results*.csv of an "
                    "analytic run", flag_values=FLAGS)
flags.DEFINE_string("compare", None, "write DIR/vp_vs_flow.{md,csv}: DIR/results.csv "
                    "(VP) and DIR/results_flow.csv side by side at equal NFE",
                    flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["problem", "checkpoint", "replot", "compare"],
                                     required=True, flag_values=FLAGS)
flags.DEFINE_string("config", "", "--checkpoint: config file[:arg] (default: "
                    "WORKDIR/config.json)", flag_values=FLAGS)
flags.DEFINE_string("samplers", "all", "comma-separated name[:key=value...]; all = every "
                    "registered sampler", flag_values=FLAGS)
flags.DEFINE_string("nfe", "5,10,20,50", "target NFEs, comma-separated", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 2000, "samples per row", flag_values=FLAGS)
flags.DEFINE_string("out", "", "output directory (default: "
                    "experiments/sampler_benchmark/<problem> or WORKDIR/sampler_benchmark)",
                    flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of x_T and of the samplers' noise", flag_values=FLAGS)
flags.DEFINE_string("schedule", analytic_bench.DEFAULT_SCHEDULE, "analytic: a VP table (linear, cosine, "
                    "...) or a Gaussian path (flow, linear_vp, cosine_vp, ve); results of "
                    "other than the default go to results_<schedule>.*", flag_values=FLAGS)
flags.DEFINE_string("pred_type", "", "analytic: what the exact model predicts (eps, x0, "
                    "v, flow); default flow on the flow path, else eps (x0 where "
                    "alpha(1) = 0)", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 1000, "analytic: resamples of the 95 % bootstrap "
                     "intervals (0: none)", flag_values=FLAGS)
flags.DEFINE_integer("T", 1000, "analytic: schedule length", flag_values=FLAGS)
flags.DEFINE_integer("ref_steps", 200, "analytic: RK4 steps", flag_values=FLAGS)
flags.DEFINE_integer("baseline_samples", 20000,
                     "analytic: true samples for the entropy baseline", flag_values=FLAGS)
flags.DEFINE_integer("cm_ode_steps", 64,
                     "analytic: RK4 steps of the exact consistency model of a mixture",
                     flag_values=FLAGS)
flags.DEFINE_bool("conditional", False, "analytic: sample class i % num_classes for sample i",
                  flag_values=FLAGS)
flags.DEFINE_float("guidance", 1.0, "checkpoint: CFG weight", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    """Runs the benchmark; argv as absl.app gives it (program name first)."""
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.replot:
        names = sorted(f for f in os.listdir(args.replot)
                       if f.startswith("results") and f.endswith(".csv"))
        if not names:
            raise FileNotFoundError(f"--replot: no results*.csv in {args.replot}")
        for name in names:  # results.csv -> metrics.png, results_flow.csv -> metrics_flow.png
            suffix = name[len("results"):-len(".csv")]
            rows = report.read_csv(os.path.join(args.replot, name))
            ref = next(r for r in rows if r["sampler"].startswith("reference ODE"))
            analytic_bench.plot_analytic(args.replot, rows, os.path.basename(os.path.normpath(args.replot))
                          + suffix.replace("_", " "), ref["rmse_ode"], suffix)
            print(f"wrote {args.replot}/metrics{suffix}.png")
        return
    if args.compare:
        path_compare.write(args.compare, "results.csv", "results_flow.csv")
        print(f"wrote {args.compare}/vp_vs_flow.md, vp_vs_flow.csv")
        return
    specs = parse_samplers(args.samplers)
    nfes = parse_ints(args.nfe, "--nfe")
    if args.num_samples < 2:
        raise ValueError(f"--num_samples must be >= 2, got {args.num_samples}")
    command = "python -m experiments.sampler_benchmark.run " + " ".join(argv[1:])
    if args.problem:
        out = report.ensure_dir(args.out or os.path.join(_HERE, args.problem))
        rows, info = analytic_bench.run_analytic(args, specs, nfes)
        suffix = analytic_bench.results_suffix(args.schedule)
        analytic_bench.write_analytic_report(out, command, rows, info, nfes, suffix)
        print(f"wrote {out}/results{suffix}.md, results{suffix}.csv, metrics{suffix}.png, "
              f"tensorboard{suffix}/")
        return
    from experiments.sampler_benchmark import checkpoint_bench
    out = report.ensure_dir(args.out or os.path.join(args.checkpoint, "sampler_benchmark"))
    checkpoint_bench.run_and_report(args, specs, nfes, out, command)
    print(f"wrote {out}/results.md, results.csv, metrics.png, tensorboard/")


if __name__ == "__main__":
    cli.run(main, FLAGS)
