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

Analytic problems: all samplers start from the same x_T [N, ...]. A deterministic
sampler's output is compared with an RK4 solve of the exact probability-flow ODE from
that x_T (diffusion.analytic.exact.reference_ode_solve; its own error is estimated
against a solve with half the steps): rmse_x0 against the clean sample at t = 0,
rmse_ode against the solution at the sampler's own end time (t = 0, or the first
trained step t = 1/T where DPM-Solver stops by default; found by
diffusion.analytic.end_time), which measures solver accuracy and convergence order.
A sampler counts as deterministic when two runs with different keys give identical
samples. Consistency samplers (CONSISTENCY_SAMPLERS) run on the
exact consistency function (closed form for one Gaussian, an RK4 solve for a mixture).
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffusion import cli, samplers
from experiments.sampler_benchmark import report
from experiments.sampler_benchmark.specs import parse_ints, parse_samplers, sampler_runs

# Default output directories of analytic problems: experiments/sampler_benchmark/<problem>.
_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("problem", None, "analytic problem: gmm2d, gmm_image, gaussian2d",
                    flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "workdir of a trained run", flag_values=FLAGS)
flags.DEFINE_string("replot", None, "redraw DIR/metrics.png from DIR/results.csv of an "
                    "analytic run", flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["problem", "checkpoint", "replot"], required=True,
                                     flag_values=FLAGS)
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
flags.DEFINE_string("schedule", "linear", "analytic: noise schedule name", flag_values=FLAGS)
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


# Samplers that expect a consistency model: on analytic problems they get the exact
# consistency function (exact_consistency_denoiser), not the posterior-mean denoiser.
CONSISTENCY_SAMPLERS = ("consistency",)


def _group_by_spec(runs):
    """(spec, target, steps, nfe) -> (spec, [(target, steps, nfe), ...]) per spec."""
    grouped = {}
    for spec, target, steps, nfe in runs:
        grouped.setdefault(id(spec), (spec, []))[1].append((target, steps, nfe))
    return list(grouped.values())


def _run_sampler(spec, denoiser, shape, steps, y, x_T, keys, check_determinism=True):
    """(samples, wall seconds after compilation, deterministic?) of one sampler run;
    deterministic when a second key gives identical samples (None: not checked)."""
    sample = samplers.get_sampler(spec.name)

    def fn(key, x_T):
        return sample(denoiser, key, shape, steps, y=y, x_T=x_T, **spec.options)
    compiled = jax.jit(fn).lower(keys[1], x_T).compile()
    t0 = time.perf_counter()
    x = jax.block_until_ready(compiled(keys[1], x_T))
    wall = time.perf_counter() - t0
    det = None
    if check_determinism:
        det = bool(np.array_equal(np.asarray(x), np.asarray(compiled(keys[6], x_T))))
    return x, wall, det


# ---- analytic problems --------------------------------------------------------------

def run_analytic(args, specs, nfes) -> tuple[list[dict], dict]:
    from diffusion.analytic import gmm as gmm_lib
    from diffusion.analytic import metrics as M
    from diffusion.analytic.end_time import format_end_time, sampler_end_time
    from diffusion.analytic.exact import (exact_consistency_denoiser, exact_denoiser,
                                          vp_reference_solve)
    from diffusion.analytic.problems import make_problem
    from diffusion.schedules import make_schedule

    problem = make_problem(args.problem, args.seed)
    gmm = problem.gmm
    schedule = make_schedule(args.schedule, args.T)
    denoiser = exact_denoiser(gmm, schedule)
    n = args.num_samples
    shape = (n,) + tuple(problem.data_shape)
    keys = jax.random.split(jax.random.key(args.seed), 7)
    y = None
    if args.conditional:
        if gmm.num_classes == 0:
            raise ValueError(f"--conditional: problem {args.problem!r} has no labels")
        y = jnp.arange(n, dtype=jnp.int32) % gmm.num_classes
    x_T = jax.random.normal(keys[0], shape)

    t0 = time.perf_counter()
    ref = vp_reference_solve(gmm, schedule, x_T, y=y, num_steps=args.ref_steps)
    ref_half = vp_reference_solve(gmm, schedule, x_T, y=y, num_steps=args.ref_steps // 2)
    ref_err = M.rmse(ref, ref_half)
    print(f"reference ODE solve: RK4 {args.ref_steps} steps, {time.perf_counter() - t0:.1f}s,"
          f" estimated error (vs {args.ref_steps // 2} steps) {ref_err:.2e}")
    true_x, _ = gmm_lib.sample(gmm, keys[2], n, y)
    true_x2, _ = gmm_lib.sample(gmm, keys[3], n, y)
    baseline = M.entropy_baseline(gmm, keys[4], args.baseline_samples, y)
    y_np = None if y is None else np.asarray(y)

    def score(x) -> dict:
        ll = M.mean_log_likelihood(gmm, x, y)
        return dict(loglik=ll, loglik_gap=baseline - ll, mode_tv=M.mode_tv(gmm, x, y_np),
                    sw=M.sliced_wasserstein(x, true_x, keys[5]))

    rows = [dict(sampler="true samples", steps=None, nfe=None, deterministic=None,
                 **score(true_x2)),
            dict(sampler=f"reference ODE (RK4 {args.ref_steps})", steps=args.ref_steps,
                 nfe=4 * args.ref_steps, deterministic=True, end_t="0", **score(ref),
                 rmse_ode=ref_err, rmse_x0=ref_err,
                 med_err_ode=float(np.median(M.per_sample_rmse(ref, ref_half))),
                 mode_flips=M.mode_flips(gmm, ref_half, ref))]

    # Samplers end at t = 0 (DDIM, Euler, Heun) or at the first trained step t = 1/T
    # (DPM-Solver's default): rmse_ode compares with the ODE solution at the sampler's
    # own end (solver accuracy), rmse_x0 with the clean sample at t = 0.
    refs = {0.0: ref}

    def ref_at(t_end: float):
        if t_end not in refs:
            refs[t_end] = vp_reference_solve(gmm, schedule, x_T, t_to=t_end, y=y,
                                             num_steps=args.ref_steps)
        return refs[t_end]
    cm_denoiser = None
    for spec, runs in _group_by_spec(sampler_runs(specs, nfes, schedule.T, schedule)):
        den = denoiser
        if spec.name in CONSISTENCY_SAMPLERS:
            if args.samplers == "all" and gmm.num_components > 1 and gmm.dim > 64:
                print(f"  {spec.label}: skipped under --samplers all (its exact consistency "
                      f"model is an ODE solve per call, slow at D={gmm.dim}); name it to run")
                continue
            if cm_denoiser is None:
                cm_denoiser = exact_consistency_denoiser(gmm, schedule,
                                                         ode_steps=args.cm_ode_steps)
            den = cm_denoiser
        outputs, stochastic = [], False
        for target, steps, nfe in runs:
            try:
                # Once stochastic, always (a one-step consistency sampler is deterministic,
                # its multistep form is not): later step counts skip the second run.
                x, wall, det = _run_sampler(spec, den, shape, steps, y, x_T, keys,
                                            check_determinism=not stochastic)
                det = bool(det)
                stochastic = not det
            except Exception as e:  # one broken sampler must not lose the others' results
                print(f"  {spec.label} at {steps} steps FAILED: {type(e).__name__}: {e}")
                rows.append(dict(sampler=spec.label, steps=steps, nfe=None,
                                 target_nfe=target, error=f"{type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120]}"))
                continue
            outputs.append((target, steps, nfe, x, wall, det))
        if not outputs:
            continue
        t_end = None
        if any(o[5] for o in outputs):
            t_end = sampler_end_time(samplers.get_sampler(spec.name), schedule,
                                     **spec.options)
        for target, steps, nfe, x, wall, det in outputs:
            row = dict(sampler=spec.label, steps=steps, nfe=nfe,
                       deterministic=det, **score(x),
                       rmse_ode=M.rmse(x, ref_at(t_end)) if det else None,
                       rmse_x0=M.rmse(x, ref) if det else None,
                       med_err_ode=(float(np.median(M.per_sample_rmse(x, ref_at(t_end))))
                                    if det else None),
                       mode_flips=M.mode_flips(gmm, x, ref) if det else None,
                       end_t=format_end_time(t_end, schedule.T) if det else None,
                       ms_per_sample=1e3 * wall / n, target_nfe=target)
            if not np.all(np.isfinite(np.asarray(x))):
                row["error"] = "non-finite samples"
            rows.append(row)
            print("  " + ", ".join(f"{k}={report.fmt(v)}" for k, v in row.items()))

    info = dict(problem=problem.name, dim=gmm.dim, components=gmm.num_components,
                rank=gmm.rank, schedule=f"{schedule.name}, T={schedule.T}", num_samples=n,
                conditional=bool(args.conditional), ref_steps=args.ref_steps,
                ref_err=ref_err, entropy_baseline=baseline)
    return rows, info


ANALYTIC_METRICS = [("rmse_ode", "RMSE vs exact ODE solution at the sampler's end time", True),
                    ("med_err_ode", "median per-sample error vs exact ODE solution", True),
                    ("rmse_x0", "RMSE vs exact ODE sample at t = 0", True),
                    ("mode_flips", "fraction of ODE trajectories that changed mode", False),
                    ("sw", "sliced Wasserstein-2 to true samples", True),
                    ("mode_tv", "mode-weight total variation", True),
                    ("loglik_gap", "|log-lik gap|: |entropy baseline - mean log p| (nats)",
                     True, abs)]


def write_analytic_report(out: str, command: str, rows, info, nfes) -> None:
    report.write_csv(os.path.join(out, "results.csv"), rows)
    floor = next(r for r in rows if r["sampler"] == "true samples")
    cols = ["sampler", "steps", "nfe", "deterministic", "end_t", "rmse_ode", "med_err_ode",
            "mode_flips", "rmse_x0", "sw", "mode_tv", "loglik", "loglik_gap", "ms_per_sample"]
    if any("error" in r for r in rows):
        cols.append("error")
    orders = report.fit_orders(rows, "rmse_ode", info["ref_err"])
    by_median = {o["sampler"]: o for o in report.fit_orders(rows, "med_err_ode",
                                                             info["ref_err"])}
    for o in orders:
        o["order_median_err"] = by_median.get(o["sampler"], {}).get("order_all")
    lines = [f"# Sampler benchmark: {info['problem']}", "", "```", command, "```", "",
             f"- mixture: D={info['dim']}, K={info['components']} components, covariance "
             f"rank {info['rank']}; schedule {info['schedule']}; {info['num_samples']} "
             f"samples, {'class-conditional' if info['conditional'] else 'unconditional'}",
             f"- entropy baseline E_p[log p] = {info['entropy_baseline']:.4g} nats/sample",
             f"- reference ODE: RK4 with {info['ref_steps']} steps, estimated error "
             f"{info['ref_err']:.2e} (RMSE vs half the steps)",
             f"- finite-sample floors (true samples): sliced W2 {floor['sw']:.3g}, "
             f"mode TV {floor['mode_tv']:.3g}",
             "- wall time: one jitted call for all samples on this machine's CPU, after "
             "compilation; noisy on a shared machine", "",
             "## All results", "", report.markdown_table(rows, cols), ""]
    for col, title, *_ in ANALYTIC_METRICS:
        title = title.replace("|", "") if col == "loglik_gap" else title
        lines += [f"## {title}", "", report.pivot(rows, col, nfes), ""]
    lines += ["## Leaders", "", "RMSE vs exact ODE sample at t = 0 (deterministic samplers):"]
    lines += report.leaders(rows, "rmse_x0", nfes) + ["", "Sliced W2 (all samplers):"]
    lines += report.leaders(rows, "sw", nfes) + [""]
    if orders:
        lines += ["## Convergence order (slope of log rmse_ode vs log NFE; last column: "
                  "of the median per-sample error)", "",
                  report.markdown_table(orders, ["sampler", "nfe_range", "order_all",
                                                 "order_last_two", "order_median_err"]), ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    plot_analytic(out, rows, info["problem"], info["ref_err"])
    report.write_tensorboard(os.path.join(out, "tensorboard"),
                             rows, [m[0] for m in ANALYTIC_METRICS] + ["ms_per_sample"])


def plot_analytic(out: str, rows, problem: str, ref_err: float) -> None:
    floor = next(r for r in rows if r["sampler"] == "true samples")
    refs = {"sw": {"true-sample floor": floor["sw"]},
            "mode_tv": {"true-sample floor": floor["mode_tv"]},
            "rmse_ode": {"reference error": ref_err},
            "rmse_x0": {"reference error": ref_err},
            "med_err_ode": {"reference error": ref_err}}
    report.plot(os.path.join(out, "metrics.png"), rows, ANALYTIC_METRICS, refs,
                title=f"{problem}: metric vs NFE")


def main(argv: Sequence[str]) -> None:
    """Runs the benchmark; argv as absl.app gives it (program name first)."""
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.replot:
        rows = report.read_csv(os.path.join(args.replot, "results.csv"))
        ref = next(r for r in rows if r["sampler"].startswith("reference ODE"))
        plot_analytic(args.replot, rows, os.path.basename(os.path.normpath(args.replot)),
                      ref["rmse_ode"])
        print(f"wrote {args.replot}/metrics.png")
        return
    specs = parse_samplers(args.samplers)
    nfes = parse_ints(args.nfe, "--nfe")
    if args.num_samples < 2:
        raise ValueError(f"--num_samples must be >= 2, got {args.num_samples}")
    command = "python -m experiments.sampler_benchmark.run " + " ".join(argv[1:])
    if args.problem:
        out = report.ensure_dir(args.out or os.path.join(_HERE, args.problem))
        rows, info = run_analytic(args, specs, nfes)
        write_analytic_report(out, command, rows, info, nfes)
    else:
        from experiments.sampler_benchmark import checkpoint_bench
        out = report.ensure_dir(args.out or os.path.join(args.checkpoint, "sampler_benchmark"))
        checkpoint_bench.run_and_report(args, specs, nfes, out, command)
    print(f"wrote {out}/results.md, results.csv, metrics.png, tensorboard/")


if __name__ == "__main__":
    cli.run(main, FLAGS)
