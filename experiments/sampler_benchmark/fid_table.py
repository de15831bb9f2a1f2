"""Samplers compared on a trained model: FID with bootstrap intervals, IS, precision, recall.

    python -m experiments.sampler_benchmark.fid_table --workdir runs/default \
        --samplers ddim,ddpm,dpmpp_2m,dpmpp_2m:grid=karras,dpmpp_3m,heun,euler,euler_a,plms \
        --nfe 5,10,20,50,100 --num_samples 2000 \
        --reference ddim:steps=500 --reference_samples 2000 \
        --out experiments/sampler_benchmark/fashion_mnist

The run's own config.json and the EMA parameters of its newest checkpoint are used (the
run is the truth: nothing on the command line changes the model). Each row draws
`num_samples` images with one sampler at one NFE (the most steps whose exact NFE, counted
from the sampler's options, fits the target; the actual NFE is what the table shows),
embeds them with the run's evaluation feature network (config.eval: the shipped
Fashion-MNIST classifier by default) and compares them with the reference split's
statistics. The 95 % interval of the FID is a percentile bootstrap over the samples
(the reference statistics held fixed), so it carries the sampling noise of n samples.

Features of every finished row are cached in OUT/features/, so an interrupted table
resumes where it stopped, and more rows can be added later. Writes OUT/results.csv
(sampler,options,nfe,num_samples,fid,fid_lo,fid_hi,is,precision,recall), OUT/results.md
and OUT/fid_vs_nfe.png.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffusion import cli, evaluation, samplers
from diffusion.evaluation import frechet
from diffusion.evaluation.inception_score import inception_score
from diffusion.evaluation.precision_recall import precision_recall
from experiments.sampler_benchmark import report
from experiments.sampler_benchmark.specs import parse_ints, parse_samplers

COLUMNS = ("sampler", "options", "nfe", "num_samples", "fid", "fid_lo", "fid_hi", "is",
           "precision", "recall")


def score(features: np.ndarray, probs: np.ndarray, ref: dict, num_resamples: int) -> dict:
    fid, lo, hi = frechet.bootstrap_fid(features, ref["mu"], ref["cov"], num_resamples)
    m = min(len(ref["features"]), len(features))
    precision, recall = precision_recall(ref["features"][:m], features[:m], 3)
    return dict(num_samples=int(features.shape[0]), fid=fid, fid_lo=lo, fid_hi=hi,
                **{"is": float(inception_score(probs, 10)[0])},
                precision=float(precision), recall=float(recall))


def steps_for(name: str, options: dict, target: int, schedule) -> tuple[int, int] | None:
    """(steps, exact NFE) with the most steps whose NFE, counted with the options, fits."""
    best = None
    for steps in range(1, min(target, schedule.T) + 1):
        n = samplers.nfe(name, steps, schedule, **options)
        if n <= target:
            best = (steps, n)
    return best


class Bench:
    """The run's model, its evaluation features and reference statistics, loaded once."""

    def __init__(self, workdir: str, batch_size: int):
        from diffusion import sampling
        from diffusion.train import evaluator
        from diffusion.train.setup import build_run
        with open(os.path.join(workdir, "config.json")) as f:
            import ml_collections
            config = ml_collections.ConfigDict(json.load(f))
        self.run = build_run(config, workdir)
        self.step = self.run.checkpointer.latest_step()
        if self.step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
        state, _ = self.run.checkpointer.restore(self.run.abstract_state)
        self.params = state.ema_params
        self.net = evaluator.feature_network(config.eval.feature_net, config.eval.feature_weights)
        self.fit_to = lambda x: evaluator._fit_to(x, self.net.name)  # noqa: E731
        from experiments.sampler_benchmark.checkpoint_bench import _reference_stats
        self.ref = _reference_stats(self.run, self.net, self.fit_to)
        n_dev = self.run.mesh.devices.size
        self.batch_size = -(-batch_size // n_dev) * n_dev
        self._sampling = sampling
        self.config = config

    def options(self, name: str, options: dict) -> dict:
        """The options a sampler runs with: the run's sample section, then these."""
        return {**self._sampling.sampler_options(self.config.sample, name), **options}

    def features(self, name: str, options: dict, steps: int, num: int, seed: int):
        """Samples `num` images and returns (pool features [N, D], class probs [N, K], s)."""
        fn = self._sampling.make_sample_fn(
            lambda p: self.run.objective.denoiser(self.run, p), image_shape=self.run.image_shape,
            num_classes=self.run.num_classes, sampler=name, num_steps=steps,
            batch_size=self.batch_size, mesh=self.run.mesh,
            options=options)
        key = jax.random.key(seed)
        # The first batch compiles; the time per sample is taken over the others.
        batches, times = [], []
        for offset in range(0, num, self.batch_size):
            t0 = time.perf_counter()
            x = fn(self.params, key, jnp.int32(offset), jnp.float32(1.0))
            batches.append(np.asarray(jax.device_get(x)))
            times.append(time.perf_counter() - t0)
        x = np.concatenate(batches)[:num]
        timed = times[1:] or times
        seconds = sum(timed) / (len(timed) * self.batch_size) * num
        out = evaluation.compute_features(self.net, self.fit_to(x), mesh=self.run.mesh,
                                          max_kept=num)
        return out["features"], out["probs"], seconds


def _cached(path: str, make):
    if os.path.exists(path):
        with np.load(path) as d:
            return d["features"], d["probs"], float(d["seconds"])
    features, probs, seconds = make()
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=features, probs=probs, seconds=seconds)
    os.replace(tmp, path)
    return features, probs, seconds


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in text)


def features_path(out: str, label: str, steps: int, num: int, seed: int) -> str:
    """Where a row's sample features are cached: OUT/features/LABEL_stepsS_nN_seedK.npz
    (key `features`; read back by experiments/flow_vs_diffusion)."""
    return os.path.join(out, "features", f"{_slug(label)}_steps{steps}_n{num}_seed{seed}.npz")


def write_outputs(out: str, rows: list[dict], command: str, meta: str) -> None:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                        for k in COLUMNS})
    cols = ["sampler", "options", "steps", "nfe", "num_samples", "fid", "fid_lo", "fid_hi",
            "is", "precision", "recall", "ms_per_sample"]
    lines = ["# Samplers on a trained model", "", "```", command, "```", "", meta, "",
             report.markdown_table(rows, cols), "", "## Against the reference at equal n", ""]
    for r in rows:
        if r["options"] == "reference":
            continue
        for ref in rows:
            if ref["options"] == "reference" and ref["num_samples"] == r["num_samples"]:
                lines.append(f"- {r['label']} at {r['nfe']} NFE: FID {r['fid']:.2f} "
                             f"[{r['fid_lo']:.2f}, {r['fid_hi']:.2f}] vs {ref['label']} "
                             f"{ref['fid']:.2f} [{ref['fid_lo']:.2f}, {ref['fid_hi']:.2f}] "
                             f"(n = {r['num_samples']}): ratio {r['fid'] / ref['fid']:.3f}")
    lines.append("")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    # A diverged row (FID in the millions) would flatten every other line: left out of
    # the plot, kept in the tables.
    plot_rows = [dict(r, sampler=r["label"], target_nfe=r["target_nfe"]) for r in rows
                 if r["options"] != "reference" and r["fid"] < 1000]
    refs = {r["label"]: r["fid"] for r in rows if r["options"] == "reference"}
    report.plot(os.path.join(out, "fid_vs_nfe.png"), plot_rows,
                [("fid", "FID (classifier features) vs NFE", True)],
                references={"fid": refs}, title="Fashion-MNIST, EMA model")


FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("workdir", None, "the trained run", flag_values=FLAGS)
flags.DEFINE_string("samplers", None, "comma-separated name[:key=value...]", flag_values=FLAGS)
flags.DEFINE_string("nfe", "5,10,20,50,100", "target NFEs, comma-separated", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 2000, "samples per row", flag_values=FLAGS)
flags.DEFINE_string("num_samples_above", "",
                    "NFE:N pairs, e.g. 50:500,100:250: fewer samples from that NFE on",
                    flag_values=FLAGS)
flags.DEFINE_string("keep_full", "",
                    "sampler@NFE items that keep --num_samples anyway, e.g. ddim@50",
                    flag_values=FLAGS)
flags.DEFINE_string("reference", "ddim:steps=500",
                    "high-NFE reference rows: name:steps=N[:opt=v], comma-separated",
                    flag_values=FLAGS)
flags.DEFINE_integer("reference_samples", 2000, "samples of each reference row",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 250, "images per sampling call", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples of the FID interval",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sample seed", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "samplers", "out"], flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    """Computes the table; argv as absl.app gives it (program name first)."""
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = FLAGS
    os.makedirs(os.path.join(args.out, "features"), exist_ok=True)
    command = "python -m experiments.sampler_benchmark.fid_table " + " ".join(
        f"--{k}={v}" for k, v in FLAGS.flag_values_dict().items() if v not in ("", None))
    nfes = parse_ints(args.nfe, "--nfe")
    fewer = {int(a): int(b) for a, b in (s.split(":") for s in args.num_samples_above.split(",")
                                         if s)}
    keep_full = set(filter(None, args.keep_full.split(",")))
    bench = Bench(args.workdir, args.batch_size)
    rows = []

    def add(label, spec_name, options, options_text, steps, nfe, target, num):
        path = features_path(args.out, label, steps, num, args.seed)
        feats, probs, seconds = _cached(path, lambda: bench.features(
            spec_name, bench.options(spec_name, options), steps, num, args.seed))
        row = dict(label=label, sampler=spec_name, options=options_text, steps=steps,
                   nfe=nfe, target_nfe=target, **score(feats, probs, bench.ref, args.bootstrap),
                   ms_per_sample=1e3 * seconds / num, features=feats, probs=probs)
        rows.append(row)
        print("  " + ", ".join(f"{k}={report.fmt(v)}" for k, v in row.items()
                               if k not in ("features", "probs")), flush=True)

    references = []
    for ref in (parse_samplers(args.reference) if args.reference else []):
        options = dict(ref.options)
        steps = int(options.pop("steps"))
        add(ref.label, ref.name, options, "reference", steps,
            samplers.nfe(ref.name, steps, bench.run.schedule, **bench.options(ref.name, options)),
            None, args.reference_samples)
        references.append(rows[-1])
    for spec in parse_samplers(args.samplers):
        opts_text = ";".join(f"{k}={v}" for k, v in spec.options.items())
        seen = set()
        for target in nfes:
            found = steps_for(spec.name, bench.options(spec.name, spec.options), target,
                              bench.run.schedule)
            if found is None or found[0] in seen:
                print(f"  {spec.label}: no new step count for NFE {target}, skipped")
                continue
            seen.add(found[0])
            num = min([args.num_samples] + [v for k, v in fewer.items() if target >= k])
            if f"{spec.label}@{target}" in keep_full:
                num = args.num_samples
            add(spec.label, spec.name, spec.options, opts_text, found[0], found[1], target, num)
            _matched_references(rows, references, num, bench.ref, args.bootstrap)
        write_outputs(args.out, rows, command, _meta(bench, args))
    write_outputs(args.out, rows, command, _meta(bench, args))


def _matched_references(rows: list, references: list, num: int, ref_stats: dict,
                        num_resamples: int) -> None:
    """Adds each reference's FID on its first `num` samples, once per n: sample i starts
    from the same noise in every row, so rows and references compare at equal n."""
    for r in references:
        if num >= r["num_samples"] or any(x["label"] == r["label"] and x["num_samples"] == num
                                         for x in rows):
            continue
        rows.append({**r, **score(r["features"][:num], r["probs"][:num], ref_stats,
                                  num_resamples)})


def _meta(bench: Bench, args) -> str:
    c = bench.config
    return (f"Run `{args.workdir}` at step {bench.step} (EMA parameters), "
            f"{c.diffusion.schedule} schedule, {c.diffusion.pred_type}-prediction. "
            f"Features: {bench.net.name}; reference: the `{c.eval.reference_split}` split "
            f"({bench.ref['num_samples']} images). Interval: 95 % percentile bootstrap over "
            f"samples ({args.bootstrap} resamples). Sample seed {args.seed}; every row uses "
            f"the same initial noise per sample index.")


if __name__ == "__main__":
    cli.run(main, FLAGS)
