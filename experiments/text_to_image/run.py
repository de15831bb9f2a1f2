"""Does the Fashion-MNIST text-to-image model follow its prompts? Class, attribute and
negative prompts, and a guidance sweep, scored with the shipped classifier.

    python -m experiments.text_to_image.run --workdir runs/text [--num 500]

The run (configs/text_fashion_mnist.py) is loaded with `diffusion.load` (EMA params of
its newest checkpoint) and sampled `--num` times per prompt:
  * class prompts "a photo of a {class}" at every guidance weight of --sweep: the share
    classified as that class (Wilson 95% intervals), per class and pooled, and the FID of
    the pooled samples against the test split in the classifier's features (95%
    bootstrap interval over the samples);
  * at --guidance: "a photo of a dark X" vs "a photo of a light X" for each class of
    --tone_classes (mean foreground brightness, +- 1.96 SE), and "footwear" with and
    without the negative prompt "sneaker" (share of sneakers).
Writes results.csv (columns prompts.CSV_COLUMNS), results.md and grid.png (one row per
prompt at --guidance) into --out. Every number in them is measured by this script.
The samples of each guidance weight are kept in OUT/cache/ (float16), so an interrupted
study resumes at the weight it stopped in.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
from absl import flags

import diffusion
from diffusion import cli, images
from diffusion.data import BatchIterator, make_source
from diffusion.evaluation import classifier_features, compute_features
from diffusion.evaluation.classifier import DEFAULT_WEIGHTS, fit_to_classifier
from diffusion.evaluation.frechet import bootstrap_fid
from diffusion.evaluation.prompts import Share, mean_interval, wilson_share
from experiments.text_to_image import prompts as P

HERE = os.path.dirname(os.path.abspath(__file__))
SNEAKER = 7

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("workdir", None, "workdir of a trained text run", flag_values=FLAGS)
flags.DEFINE_string("out", HERE, "where results.csv, results.md, grid.png go",
                    flag_values=FLAGS)
flags.DEFINE_integer("num", 500, "samples per prompt", flag_values=FLAGS)
flags.DEFINE_float("guidance", 3.0, "w of the attribute and negative prompts",
                   flag_values=FLAGS)
flags.DEFINE_list("sweep", ["1", "2", "3", "5", "7.5"], "guidance weights of the class "
                  "prompts", flag_values=FLAGS)
flags.DEFINE_list("tone_classes", ["0", "7", "8"], "classes of the dark / light prompts",
                  flag_values=FLAGS)
flags.DEFINE_string("sampler", "", "default: the run's sample.sampler", flag_values=FLAGS)
flags.DEFINE_integer("steps", 0, "default: the run's sample.num_steps", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 250, "images per sampling call", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples of the FID interval",
                     flag_values=FLAGS)
flags.DEFINE_string("reference_dir", "", "Fashion-MNIST IDX files of the test split (\"\" = "
                    "Debian's dataset-fashion-mnist)", flag_values=FLAGS)
flags.DEFINE_string("classifier", DEFAULT_WEIGHTS, "classifier weights", flag_values=FLAGS)
flags.DEFINE_integer("grid_columns", 10, "samples per grid row", flag_values=FLAGS)


def _plan(sweep: list[float], guidance: float, tone_classes: list[int]) -> dict:
    """{w: [(prompt, negative), ...]}: the class prompts at each w, and at `guidance`
    also the tone prompts and "footwear" without / with the negative "sneaker"."""
    plan = {w: [(p, "") for p in P.class_prompts()] for w in sweep}
    extra = [(p, "") for k in tone_classes for p in P.tone_prompts(k)]
    extra += [("footwear", ""), ("footwear", "sneaker")]
    plan.setdefault(guidance, [(p, "") for p in P.class_prompts()])
    plan[guidance] = plan[guidance] + extra
    return plan


def _reference(net, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    source = make_source("fashion_mnist_idx", "test", data_dir or None)
    batches = BatchIterator(source, 250, 0, shuffle=False, num_epochs=1,
                            drop_remainder=False)
    out = compute_features(net, ({"image": b["image"]} for b in batches),
                           max_kept=len(source))
    return out["stats"].mu, out["stats"].cov


def _sample(pipe, pairs, w: float, sampler: str, steps: int) -> list[np.ndarray]:
    """[n, H, W, C] per (prompt, negative) pair, prompt-major as Pipeline.sample draws;
    read from OUT/cache when this weight was sampled before with the same settings."""
    key = f"w{w:g}_{sampler}_{steps}_n{FLAGS.num}_seed{FLAGS.seed}_step{pipe.step}"
    path = os.path.join(FLAGS.out, "cache", key + ".npz")
    texts = np.array([f"{p}\x00{n}" for p, n in pairs])
    if os.path.exists(path):
        with np.load(path) as d:
            if list(d["pairs"]) == list(texts):
                return np.split(d["x"].astype(np.float32), len(pairs))
    x = pipe.sample(sampler, steps, FLAGS.num, seed=FLAGS.seed, guidance=w,
                    batch_size=FLAGS.batch_size, prompt=[p for p, _ in pairs],
                    negative_prompt=[n for _, n in pairs])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", x=x.astype(np.float16), pairs=texts)
    os.replace(path + ".tmp.npz", path)
    return np.split(x.astype(np.float16).astype(np.float32), len(pairs))


def measure(pipe, net, ref: tuple, plan: dict, sampler: str, steps: int):
    """(rows, {(prompt, negative): samples at FLAGS.guidance}, sneaker shares)."""
    rows, shown, sneakers = [], {}, {}
    for w, pairs in plan.items():
        samples = _sample(pipe, pairs, w, sampler, steps)
        x = np.concatenate(samples)
        feats = compute_features(net, np.asarray(fit_to_classifier(x)), max_kept=len(x))
        probs = np.split(feats["probs"], len(pairs))
        n_class = P.NUM_CLASSES * FLAGS.num  # the class prompts come first
        for (prompt, negative), xs, pr in zip(pairs, samples, probs):
            rows.append(P.score(prompt, negative, w, xs, pr))
            if prompt == "footwear":
                sneakers[negative] = P.share_in(P.predicted(pr), {SNEAKER})
            if w == FLAGS.guidance:
                shown[(prompt, negative)] = xs
        fid = Share(*bootstrap_fid(feats["features"][:n_class], *ref, FLAGS.bootstrap),
                    n_class)
        pooled = np.concatenate(probs[:P.NUM_CLASSES])
        labels = np.repeat(np.arange(P.NUM_CLASSES), FLAGS.num)
        hits = int((P.predicted(pooled) == labels).sum())
        rows.append(P.Row(P.ALL_CLASSES, "", float(w), n_class,
                          wilson_share(hits, n_class),
                          mean_interval(P.brightness(x[:n_class])), fid))
    return rows, shown, sneakers


def _interval(s) -> str:
    return f"{s.value:.3f} [{s.lo:.3f}, {s.hi:.3f}]"


def write_markdown(path: str, rows: list, sneakers: dict, meta: dict) -> None:
    g = FLAGS.guidance
    at_g = {(r.prompt, r.negative_prompt): r for r in rows if r.guidance == g}
    lines = ["# Text-to-image on Fashion-MNIST: does the model follow its prompts?", "",
             "Measured by `python -m experiments.text_to_image.run` "
             f"({' '.join(meta['argv'])}).", "",
             f"Run {meta['workdir']} at step {meta['step']}; {meta['sampler']} with "
             f"{meta['steps']} steps, seed {FLAGS.seed}, n = {FLAGS.num} samples per prompt. "
             "Intervals: Wilson 95% for shares, mean +- 1.96 SE for brightness, 95% "
             "bootstrap over the samples for FID.", "",
             f"## Class prompts at w = {g:g}", "", "| prompt | class accuracy |",
             "|---|---|"]
    for p in P.class_prompts():
        lines.append(f"| {p} | {_interval(at_g[(p, '')].accuracy)} |")
    lines.append(f"| **pooled** | {_interval(at_g[(P.ALL_CLASSES, '')].accuracy)} |")
    lines += ["", f"## Tone prompts at w = {g:g} (mean foreground brightness)", "",
              "| class | dark | light |", "|---|---|---|"]
    for k in (int(c) for c in FLAGS.tone_classes):
        dark, light = (at_g[(p, "")].brightness for p in P.tone_prompts(k))
        name = P.captions.CLASS_WORDS[k][0][0]
        lines.append(f"| {name} | {_interval(dark)} | {_interval(light)} |")
    lines += ["", f"## Negative prompt at w = {g:g}: share of sneakers", "",
              "| prompt | negative | sneakers |", "|---|---|---|"]
    for negative, share in sneakers.items():
        lines.append(f"| footwear | {negative} | {_interval(share)} |")
    lines += ["", "## Guidance sweep (class prompts pooled)", "",
              "| w | class accuracy | FID (classifier features, test split) |",
              "|---|---|---|"]
    for r in rows:
        if r.prompt == P.ALL_CLASSES:
            fid = f"{r.fid.value:.2f} [{r.fid.lo:.2f}, {r.fid.hi:.2f}]"
            lines.append(f"| {r.guidance:g} | {_interval(r.accuracy)} | {fid} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> dict:
    cli.parse(FLAGS, argv)
    if not FLAGS.workdir:
        raise SystemExit("--workdir is required: the workdir of a trained text run")
    pipe = diffusion.load(FLAGS.workdir)
    if not pipe.is_text:
        raise SystemExit(f"{FLAGS.workdir} is not a text-conditional run (model.text)")
    sampler = FLAGS.sampler or str(pipe.config.sample.sampler)
    steps = FLAGS.steps or int(pipe.config.sample.num_steps)
    sweep = [float(w) for w in FLAGS.sweep]
    plan = _plan(sweep, FLAGS.guidance, [int(k) for k in FLAGS.tone_classes])
    net = classifier_features(FLAGS.classifier)
    ref = _reference(net, FLAGS.reference_dir)
    rows, shown, sneakers = measure(pipe, net, ref, plan, sampler, steps)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(P.CSV_COLUMNS)
        writer.writerows(r.csv_fields() for r in rows)
    meta = dict(argv=list(argv[1:]), workdir=FLAGS.workdir, step=pipe.step,
                sampler=sampler, steps=steps)
    write_markdown(os.path.join(FLAGS.out, "results.md"), rows, sneakers, meta)
    m = min(FLAGS.grid_columns, FLAGS.num)
    grid = np.concatenate([xs[:m] for xs in shown.values()])
    images.save_png(os.path.join(FLAGS.out, "grid.png"), images.make_grid(grid, m))
    return {"rows": rows, "sneakers": sneakers}


if __name__ == "__main__":
    cli.run(main, FLAGS)
