"""The analytic half of the sampler benchmark: samplers against the exact ground truth
of a Gaussian mixture on any Gaussian path (a VP table, or the rectified-flow path and
the other continuous paths of diffusion.paths), and its report.

    rows, info = run_analytic(args, specs, nfes)     # args: run.py's flags
    write_analytic_report(out, command, rows, info, nfes, results_suffix(args.schedule))

All samplers start from the same x_T [N, ...]. A deterministic sampler's output is
compared with an RK4 solve of the exact probability-flow ODE (exact.vp_reference_solve)
from the sampler's own start (the time of its first evaluation and its start state
there, start_std(t_start) x_T: DDIM and the flow samplers start at t = 1, DPM-Solver at
the path's t_max, Euler / Heun at sigma_ve = 80) to its own end (t = 0, or DPM-Solver's
default first trained step; diffusion.analytic.end_time): rmse_ode. rmse_x0 compares
with the solve from the same start to t = 0. The reference's own error is estimated
from t = 1 against a solve with half the steps. A sampler counts as deterministic when
two runs with different keys give identical samples. Consistency samplers
(CONSISTENCY_SAMPLERS) run on the exact consistency function. Every metric of a row has
a 95 % percentile-bootstrap interval over its samples (intervals.py).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import samplers
from experiments.sampler_benchmark import intervals, report
from experiments.sampler_benchmark.specs import sampler_runs

# The benchmark's default schedule: its results are results.csv, others results_<name>.csv.
DEFAULT_SCHEDULE = "linear"


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


def make_path(name: str, T: int):
    """--schedule: a discrete VP table (schedules.make_schedule: linear, cosine, ...) or
    a continuous Gaussian path (paths.make_path: flow, linear_vp, cosine_vp, ve)."""
    from diffusion import paths
    from diffusion.schedules import BETA_SCHEDULES, make_schedule
    if name in paths.PATHS:
        return paths.make_path(name, T=T)
    if name in BETA_SCHEDULES:
        return make_schedule(name, T)
    raise ValueError(f"--schedule {name!r} is neither a VP table {sorted(BETA_SCHEDULES)} "
                     f"nor a Gaussian path {sorted(paths.PATHS)}")


def default_pred_type(path) -> str:
    """The exact model's parameterisation: the flow velocity on the flow path (what a
    flow-matching model predicts); eps where alpha(1) > 0; else x0 (an eps model is
    undefined where alpha = 0, and samplers evaluate there)."""
    from diffusion.paths import FlowPath
    if isinstance(path, FlowPath):
        return "flow"
    return "eps" if float(path.host.alpha(1.0)) > 0.0 else "x0"


def results_suffix(schedule: str) -> str:
    """"" for the default schedule (results.csv), "_<schedule>" otherwise
    (results_flow.csv), so the paths of one problem share its folder."""
    return "" if schedule == DEFAULT_SCHEDULE else f"_{schedule}"


def sampler_start(spec, path, steps: int) -> tuple[float, float]:
    """(t_start, scale): the time of the sampler's first evaluation and the factor that
    makes its start state there from x_T (1 on VP paths; start_std(t_start) on the flow
    path, where DPM-Solver starts at t_max = 1 - 1/T, Euler / Heun at sigma_ve = 80 and
    DDIM and the flow samplers at t = 1). Read off one run on a 2-D point mass."""
    from diffusion.analytic.exact import exact_denoiser
    from diffusion.analytic.gmm import from_covariances
    point = from_covariances([1.0], [[0.0, 0.0]], [np.eye(2)])
    den = exact_denoiser(point, path, pred_type="x0")
    sample = samplers.get_sampler(spec.name)
    _, traj = jax.jit(lambda x: sample(den, jax.random.key(0), x.shape, steps, x_T=x,
                                       return_intermediates=True, **spec.options))(
        jnp.ones((1, 2), jnp.float32))
    return float(traj.t[0]), float(traj.x[0][0, 0])


def run_analytic(args, specs, nfes) -> tuple[list[dict], dict]:
    from diffusion.analytic import gmm as gmm_lib
    from diffusion.analytic import metrics as M
    from diffusion.analytic.end_time import format_end_time, sampler_end_time
    from diffusion.analytic.exact import (exact_consistency_denoiser, exact_denoiser,
                                          vp_reference_solve)
    from diffusion.analytic.problems import make_problem

    problem = make_problem(args.problem, args.seed)
    gmm = problem.gmm
    schedule = make_path(args.schedule, args.T)
    pred_type = args.pred_type or default_pred_type(schedule)
    denoiser = exact_denoiser(gmm, schedule, pred_type=pred_type)
    n = args.num_samples
    shape = (n,) + tuple(problem.data_shape)
    keys = jax.random.split(jax.random.key(args.seed), 7)
    y = None
    if args.conditional:
        if gmm.num_classes == 0:
            raise ValueError(f"--conditional: problem {args.problem!r} has no labels")
        y = jnp.arange(n, dtype=jnp.int32) % gmm.num_classes
    x_T = jax.random.normal(keys[0], shape)

    # The exact ODE solution from each sampler's own start (t_start, start state
    # scale x_T) to t_end: refs[(t_start, scale, t_end)].
    refs = {}

    def ref_at(t_start: float, scale: float, t_end: float, num_steps: int = args.ref_steps):
        key = (t_start, scale, t_end, num_steps)
        if key not in refs:
            refs[key] = vp_reference_solve(gmm, schedule, scale * x_T, t_from=t_start,
                                           t_to=t_end, y=y, num_steps=num_steps)
        return refs[key]

    t0 = time.perf_counter()
    scale_1 = float(schedule.host.start_std(1.0))
    ref = ref_at(1.0, scale_1, 0.0)
    ref_half = ref_at(1.0, scale_1, 0.0, args.ref_steps // 2)
    ref_err = M.rmse(ref, ref_half)
    print(f"reference ODE solve: RK4 {args.ref_steps} steps, {time.perf_counter() - t0:.1f}s,"
          f" estimated error (vs {args.ref_steps // 2} steps) {ref_err:.2e}")
    true_x, _ = gmm_lib.sample(gmm, keys[2], n, y)
    true_x2, _ = gmm_lib.sample(gmm, keys[3], n, y)
    baseline = M.entropy_baseline(gmm, keys[4], args.baseline_samples, y)
    y_np = None if y is None else np.asarray(y)
    true_weights = M.true_mode_weights(gmm, y_np)

    def score(x, ref_end=None, ref_0=None) -> dict:
        """Metrics of samples x, with 95 % bootstrap intervals (intervals.py); the ODE
        errors against ref_end (the solution at the sampler's end time) and ref_0."""
        loglik = M.log_likelihoods(gmm, x, y)
        modes = M.mode_assignments(gmm, x)
        weights = np.bincount(modes, minlength=gmm.num_components) / n
        out = dict(loglik=float(np.mean(loglik)), loglik_gap=baseline - float(np.mean(loglik)),
                   mode_tv=float(0.5 * np.abs(weights - true_weights).sum()),
                   sw=M.sliced_wasserstein(x, true_x, keys[5]))
        per = intervals.PerSample(loglik=loglik, modes=modes)
        if ref_end is not None:
            per.sq_err_ode = intervals.sq_errors(x, ref_end)
            per.sq_err_x0 = intervals.sq_errors(x, ref_0)
            out.update(rmse_ode=M.rmse(x, ref_end), rmse_x0=M.rmse(x, ref_0),
                       med_err_ode=float(np.median(np.sqrt(per.sq_err_ode))),
                       mode_flips=M.mode_flips(gmm, x, ref_0))
        out.update(intervals.bootstrap(per, baseline=baseline, true_weights=true_weights,
                                       num_resamples=args.bootstrap, seed=args.seed))
        return out

    ref_row = score(ref, ref_half, ref_half)
    ref_row.update(rmse_ode=ref_err, rmse_x0=ref_err)
    rows = [dict(sampler="true samples", steps=None, nfe=None, deterministic=None,
                 num_samples=n, **score(true_x2)),
            dict(sampler=f"reference ODE (RK4 {args.ref_steps})", steps=args.ref_steps,
                 nfe=4 * args.ref_steps, deterministic=True, num_samples=n, start_t=1.0,
                 end_t="0",
                 **ref_row)]

    cm_denoiser = None
    from_all = (set(samplers.SAMPLERS)
                if "all" in (s.strip() for s in args.samplers.split(",")) else set())
    for spec, runs in _group_by_spec(sampler_runs(specs, nfes, schedule.T, schedule)):
        den = denoiser
        if spec.name in CONSISTENCY_SAMPLERS:
            if spec.label in from_all and gmm.num_components > 1 and gmm.dim > 64:
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
        # Samplers end at t = 0 (DDIM, Euler, Heun, flow_*) or at the first trained step
        # (DPM-Solver's default): rmse_ode compares with the ODE solution from the
        # sampler's own start to its own end (solver accuracy), rmse_x0 with the one
        # from its start to t = 0.
        t_end = None
        if any(o[5] for o in outputs):
            t_end = sampler_end_time(samplers.get_sampler(spec.name), schedule,
                                     **spec.options)
        for target, steps, nfe, x, wall, det in outputs:
            start_t = refs_end = refs_0 = None
            if det:
                start_t, scale = sampler_start(spec, schedule, steps)
                refs_end = ref_at(start_t, scale, t_end)
                refs_0 = ref_at(start_t, scale, 0.0)
            row = dict(sampler=spec.label, steps=steps, nfe=nfe, deterministic=det,
                       num_samples=n, start_t=start_t,
                       end_t=format_end_time(t_end, schedule.T) if det else None,
                       **score(x, refs_end, refs_0),
                       ms_per_sample=1e3 * wall / n, target_nfe=target)
            if not np.all(np.isfinite(np.asarray(x))):
                row["error"] = "non-finite samples"
            rows.append(row)
            print("  " + ", ".join(f"{k}={report.fmt(v)}" for k, v in row.items()))

    info = dict(problem=problem.name, dim=gmm.dim, components=gmm.num_components,
                rank=gmm.rank, schedule=f"{schedule.name}, T={schedule.T}",
                pred_type=pred_type, num_samples=n, conditional=bool(args.conditional),
                ref_steps=args.ref_steps, ref_err=ref_err, entropy_baseline=baseline,
                bootstrap=args.bootstrap, num_refs=len(refs) - 1)
    return rows, info


ANALYTIC_METRICS = [("rmse_ode", "RMSE vs exact ODE solution at the sampler's end time", True),
                    ("med_err_ode", "median per-sample error vs exact ODE solution", True),
                    ("rmse_x0", "RMSE vs exact ODE sample at t = 0", True),
                    ("mode_flips", "fraction of ODE trajectories that changed mode", False),
                    ("sw", "sliced Wasserstein-2 to true samples", True),
                    ("mode_tv", "mode-weight total variation", True),
                    ("loglik_gap", "|log-lik gap|: |entropy baseline - mean log p| (nats)",
                     True, abs)]


def _with_intervals(rows, metrics=("rmse_ode", "loglik_gap")) -> list[dict]:
    """Rows with a "<metric> 95%" column "[lo, hi]" for the markdown tables."""
    out = []
    for r in rows:
        r = dict(r)
        for m in metrics:
            if r.get(f"{m}_lo") is not None:
                r[f"{m} 95%"] = (f"[{report.fmt(r[f'{m}_lo'])}, "
                                 f"{report.fmt(r[f'{m}_hi'])}]")
        out.append(r)
    return out


def write_analytic_report(out: str, command: str, rows, info, nfes,
                          suffix: str = "") -> None:
    """results{suffix}.csv / .md, metrics{suffix}.png and tensorboard{suffix}/ in out."""
    report.write_csv(os.path.join(out, f"results{suffix}.csv"), rows)
    floor = next(r for r in rows if r["sampler"] == "true samples")
    cols = ["sampler", "steps", "nfe", "deterministic", "start_t", "end_t", "rmse_ode",
            "rmse_ode 95%", "med_err_ode", "mode_flips", "rmse_x0", "sw", "mode_tv",
            "loglik", "loglik_gap", "loglik_gap 95%", "ms_per_sample"]
    if any("error" in r for r in rows):
        cols.append("error")
    orders = report.fit_orders(rows, "rmse_ode", info["ref_err"])
    by_median = {o["sampler"]: o for o in report.fit_orders(rows, "med_err_ode",
                                                             info["ref_err"])}
    for o in orders:
        o["order_median_err"] = by_median.get(o["sampler"], {}).get("order_all")
    lines = [f"# Sampler benchmark: {info['problem']} on {info['schedule']}", "", "```",
             command, "```", "",
             f"- mixture: D={info['dim']}, K={info['components']} components, covariance "
             f"rank {info['rank']}; path {info['schedule']}; exact model predicts "
             f"{info['pred_type']}; {info['num_samples']} samples, "
             f"{'class-conditional' if info['conditional'] else 'unconditional'}",
             f"- entropy baseline E_p[log p] = {info['entropy_baseline']:.4g} nats/sample",
             f"- reference ODE: RK4 with {info['ref_steps']} steps, estimated error "
             f"{info['ref_err']:.2e} (RMSE vs half the steps, from t = 1); each sampler is "
             f"compared with the solve from its own start (start_t, start state "
             f"start_std(start_t) x_T) to its end ({info['num_refs']} solves)",
             f"- 95 % intervals: percentile bootstrap over the {info['num_samples']} "
             f"samples ({info['bootstrap']} resamples; columns *_lo, *_hi of the CSV)",
             f"- finite-sample floors (true samples): sliced W2 {floor['sw']:.3g}, "
             f"mode TV {floor['mode_tv']:.3g}",
             "- wall time: one jitted call for all samples on this machine's CPU, after "
             "compilation; noisy on a shared machine", "",
             "## All results", "", report.markdown_table(_with_intervals(rows), cols), ""]
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
    with open(os.path.join(out, f"results{suffix}.md"), "w") as f:
        f.write("\n".join(lines))
    plot_analytic(out, rows, f"{info['problem']} ({info['schedule']})", info["ref_err"],
                  suffix)
    report.write_tensorboard(os.path.join(out, f"tensorboard{suffix}"),
                             rows, [m[0] for m in ANALYTIC_METRICS] + ["ms_per_sample"])


def plot_analytic(out: str, rows, problem: str, ref_err: float, suffix: str = "") -> None:
    floor = next(r for r in rows if r["sampler"] == "true samples")
    refs = {"sw": {"true-sample floor": floor["sw"]},
            "mode_tv": {"true-sample floor": floor["mode_tv"]},
            "rmse_ode": {"reference error": ref_err},
            "rmse_x0": {"reference error": ref_err},
            "med_err_ode": {"reference error": ref_err}}
    report.plot(os.path.join(out, f"metrics{suffix}.png"), rows, ANALYTIC_METRICS, refs,
                title=f"{problem}: metric vs NFE")
