"""The sampler benchmark on a trained checkpoint: EMA params of the newest checkpoint in
WORKDIR, samples from each sampler at each NFE, FID-style metrics from
diffusion.evaluation with the feature network named by config.eval (feature_net,
feature_weights, through diffusion.train.evaluator as training's own evaluation does)
against reference statistics of config.eval.reference_split (cached in the workdir)."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import jax
import ml_collections
import numpy as np

from experiments.sampler_benchmark import report
from experiments.sampler_benchmark.specs import sampler_runs

def load_config(workdir: str, config_arg: str) -> ml_collections.ConfigDict:
    """From "path.py[:arg]" (get_config(arg)), else the run's own WORKDIR/config.json."""
    if config_arg:
        path, _, arg = config_arg.partition(":")
        spec = importlib.util.spec_from_file_location("_bench_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --config configs/NAME.py[:ARG]")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _reference_stats(run, net, fit_to):
    """Reference statistics of config.eval.reference_split, cached in the workdir under
    the same name the training-time evaluator uses, so the two share one file."""
    from diffusion import evaluation
    from diffusion.data import BatchIterator, make_source
    c = run.config
    source = make_source(c.data.source, c.eval.reference_split, c.data.data_dir or None)
    cache = os.path.join(run.workdir, f"ref_stats_{net.name}_{c.eval.reference_split}_"
                         f"{run.image_shape[0]}x{run.image_shape[1]}.npz")
    batches = BatchIterator(source, 250, 0, shuffle=False, image_size=run.image_shape[:2],
                            num_epochs=1, drop_remainder=False)
    return evaluation.reference_stats(net, ({"image": fit_to(b["image"])} for b in batches),
                                      cache)


def run_and_report(args, specs, nfes, out: str, command: str) -> None:
    try:
        from diffusion import evaluation
        from diffusion.train import evaluator
    except ImportError as e:
        raise NotImplementedError(f"the checkpoint benchmark needs diffusion.evaluation and "
                                  f"diffusion.train.evaluator ({e})") from e
    from diffusion.autoencoder.sample_decoding import decoding_sample_fn
    from diffusion import sampling
    from diffusion.train.setup import build_run

    config = load_config(args.checkpoint, args.config)
    run = build_run(config, args.checkpoint)
    step = run.checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run.workdir}/checkpoints")
    feature_fn = evaluator.feature_network(config.eval.feature_net, config.eval.feature_weights)
    # The evaluator's adapter (resize to the classifier's 28x28x1), so FIDs match training's.
    fit_to = lambda x: evaluator._fit_to(x, feature_fn.name)  # noqa: E731
    state, _ = run.checkpointer.restore(run.abstract_state)
    ref = _reference_stats(run, feature_fn, fit_to)
    n = args.num_samples
    n_dev = run.mesh.devices.size
    bs = int(np.ceil(min(config.sample.batch_size, n) / n_dev) * n_dev)
    key = jax.random.key(args.seed)
    rows = []
    options_for = lambda spec: {**sampling.sampler_options(config.sample, spec.name),  # noqa: E731
                                **spec.options}
    for spec, target, steps, nfe in sampler_runs(specs, nfes, run.schedule.T, run.schedule,
                                                 options_for):
        options = options_for(spec)
        fn = sampling.make_sample_fn(
            lambda params: run.objective.denoiser(run, params), image_shape=run.image_shape,
            num_classes=run.num_classes, sampler=spec.name, num_steps=steps, batch_size=bs,
            mesh=run.mesh, options=options)
        fn = decoding_sample_fn(run, fn)  # latent runs: decode with the VAE
        # One warm-up batch compiles; the timed pass then measures sampling alone.
        jax.block_until_ready(fn(state.ema_params, key, np.int32(0), np.float32(args.guidance)))
        t0 = time.perf_counter()
        x = sampling.generate(fn, state.ema_params, key, n, bs, args.guidance)
        wall = time.perf_counter() - t0
        metrics = evaluation.evaluate_samples(fit_to(x), feature_fn, ref, mesh=run.mesh)
        metrics.pop("num_samples", None)
        row = dict(sampler=spec.label, steps=steps, nfe=nfe,
                   **{k: float(v) for k, v in metrics.items()},
                   ms_per_sample=1e3 * wall / n, target_nfe=target)
        rows.append(row)
        print("  " + ", ".join(f"{k}={report.fmt(v)}" for k, v in row.items()))
    run.checkpointer.close()
    if not rows:
        raise ValueError("no sampler produced results")

    report.write_csv(os.path.join(out, "results.csv"), rows)
    metric_cols = [c for c in report.columns_of(rows)
                   if c not in report.KEY_COLUMNS + ("target_nfe", "ms_per_sample")]
    fid = next((c for c in metric_cols if c.startswith("fid_")), None)
    lines = [f"# Sampler benchmark: checkpoint {args.checkpoint} (step {step})", "",
             "```", command, "```", "",
             f"- {n} samples, guidance {args.guidance}, features: {feature_fn.name}", "",
             report.markdown_table(rows, ["sampler", "steps", "nfe"] + metric_cols
                                   + ["ms_per_sample"]), ""]
    if fid:
        lines += [f"## {fid}", "", report.pivot(rows, fid, nfes), "", "Leaders:"]
        lines += report.leaders(rows, fid, nfes) + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    report.plot(os.path.join(out, "metrics.png"), rows,
                [(c, c, c.startswith("fid_")) for c in metric_cols],
                title=f"{args.checkpoint}: metric vs NFE")
    report.write_tensorboard(os.path.join(out, "tensorboard"), rows,
                             metric_cols + ["ms_per_sample"])
