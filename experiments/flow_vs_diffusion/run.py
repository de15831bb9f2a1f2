"""Flow matching vs v-prediction diffusion on Fashion-MNIST, and the few-step models
built on them (2-rectified flow, consistency distillation): FID at equal NFE.

    python -m experiments.flow_vs_diffusion.run \
        --diffusion runs/flow_vs_diffusion/train.objective=diffusion \
        --flow runs/flow_vs_diffusion/train.objective=flow \
        --flow_pairs runs/flow_vs_diffusion/train.objective=flow \
        --reflow runs/reflow_fashion_mnist --cd runs/cd_default --num_samples 2000

Each model given is measured by `experiments.sampler_benchmark.fid_table` (one process
per model, features cached in OUT/tables/MODEL/features, so an interrupted study resumes)
with the samplers of ARMS at its NFEs: FID in the shipped classifier's features against
the test split, 95 % bootstrap intervals over the samples, the same initial noise per
sample index in every row. Then OUT/results.csv (model,sampler,nfe,num_samples,fid,
fid_lo,fid_hi) and OUT/results.md: one table of FID by NFE, the few-step comparison, and
the analytic VP-vs-flow table of experiments/sampler_benchmark (exact ground truth).
A model not given is left out of the tables. `--reuse=diffusion,flow` takes those models'
rows from the OUT/tables/MODEL/results.csv an earlier run wrote (their workdir flags are
still given, for the table's workdir column), so one retrained model can be re-measured
alone.
"""
from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
from typing import Sequence

from absl import app, flags

from diffusion import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ANALYTIC = os.path.join(os.path.dirname(HERE), "sampler_benchmark", "gmm2d", "vp_vs_flow.md")
COLUMNS = ("model", "sampler", "nfe", "num_samples", "fid", "fid_lo", "fid_hi")
# model -> (what it is, samplers, target NFEs)
ARMS = {
    "diffusion": ("v-prediction diffusion (configs/default.py)", "ddim,dpmpp_2m",
                  "1,2,4,8,16,50"),
    "flow": ("flow matching (the same network, data, optimizer and steps)",
             "flow_euler,dpmpp_2m", "1,2,4,8,16,50"),
    "flow_pairs": ("the flow model sampled as the reflow pairs were drawn (flow_midpoint, "
                   "10 steps): the distribution reflow learns", "flow_midpoint", "20"),
    "reflow": ("2-rectified flow (reflow of the flow model)", "flow_euler", "1,2,4"),
    "cd": ("consistency distillation of the diffusion model", "consistency", "1,2,4"),
}

FLAGS = flags.FlagValues()
for _name, (_what, _, _) in ARMS.items():
    flags.DEFINE_string(_name, "", f"workdir of the {_what} (\"\" = left out)",
                        flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 2000, "samples per row", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 500, "images per sampling call", flag_values=FLAGS)
flags.DEFINE_string("out", HERE, "where results.csv and results.md go", flag_values=FLAGS)
flags.DEFINE_list("reuse", [], "models whose OUT/tables/MODEL/results.csv is used as it is "
                  "instead of measuring them again", flag_values=FLAGS)


def measure(model: str, workdir: str, out: str, num_samples: int, batch_size: int,
            reuse: bool = False) -> str:
    """Runs fid_table for one model; returns its results.csv. reuse: return the one an
    earlier run wrote, without measuring."""
    _, sampler_list, nfe = ARMS[model]
    folder = os.path.join(out, "tables", model)
    if reuse:
        path = os.path.join(folder, "results.csv")
        if not os.path.exists(path):
            raise app.UsageError(f"--reuse={model}: {path} does not exist; measure {model} "
                                 "first (leave it out of --reuse)")
        return path
    cmd = [sys.executable, "-m", "experiments.sampler_benchmark.fid_table",
           f"--workdir={workdir}", f"--samplers={sampler_list}", f"--nfe={nfe}",
           f"--num_samples={num_samples}", "--reference=", f"--batch_size={batch_size}",
           f"--out={folder}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return os.path.join(folder, "results.csv")


def collect(tables: dict[str, str]) -> list[dict]:
    """The rows of each model's results.csv, with the model's name."""
    rows = []
    for model, path in tables.items():
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append(dict(model=model, sampler=r["sampler"], nfe=int(r["nfe"]),
                                 num_samples=int(r["num_samples"]), fid=float(r["fid"]),
                                 fid_lo=float(r["fid_lo"]), fid_hi=float(r["fid_hi"])))
    return rows


def _cell(r: dict) -> str:
    return f"{r['fid']:.2f} [{r['fid_lo']:.2f}, {r['fid_hi']:.2f}]"


def _find(rows, model, sampler, nfe):
    return next((r for r in rows if (r["model"], r["sampler"], r["nfe"]) ==
                 (model, sampler, nfe)), None)


def cd_ratio_interval(out: str, cd_workdir: str | None, num_samples: int):
    """(ratio, lo, hi) of the CD student's 2-step FID to the teacher's DDIM-50 FID, a
    bootstrap over both sample sets (fid_ratio), from the features fid_table cached in
    OUT/tables/{cd,diffusion}/features and the reference statistics in the CD run's
    workdir; None where any of them is missing (e.g. tables made on another machine)."""
    from experiments.sampler_benchmark.fid_table import features_path
    a = features_path(os.path.join(out, "tables", "cd"), "consistency", 2, num_samples, 0)
    b = features_path(os.path.join(out, "tables", "diffusion"), "ddim", 50, num_samples, 0)
    refs = sorted(glob.glob(os.path.join(cd_workdir or "", "ref_stats_*.npz")))
    if not (cd_workdir and len(refs) == 1 and os.path.exists(a) and os.path.exists(b)):
        return None
    from experiments.flow_vs_diffusion.fid_ratio import fid_ratio
    r = fid_ratio(a, b, refs[0])
    return r["ratio"], r["ratio_lo"], r["ratio_hi"]


def few_step_lines(rows: list[dict], cd_ratio=None) -> list[str]:
    """The few-step comparisons the explainers make, each with its intervals; a
    difference is claimed only where the intervals are disjoint. cd_ratio: the
    (ratio, lo, hi) of cd_ratio_interval, if known."""
    lines = []

    def compare(a, b, what):
        if a is None or b is None:
            return
        if a["fid_hi"] < b["fid_lo"]:
            verdict = "lower, intervals disjoint"
        elif a["fid_lo"] > b["fid_hi"]:
            verdict = "higher, intervals disjoint"
        else:
            verdict = "no difference claimed (intervals overlap)"
        lines.append(f"- {what}: {_cell(a)} vs {_cell(b)}: {verdict}.")
    for nfe in (1, 2, 4):
        compare(_find(rows, "flow", "flow_euler", nfe), _find(rows, "diffusion", "ddim", nfe),
                f"flow (Euler) vs diffusion (DDIM) at {nfe} NFE")
        compare(_find(rows, "reflow", "flow_euler", nfe), _find(rows, "flow", "flow_euler", nfe),
                f"2-rectified flow vs flow, Euler at {nfe} NFE")
        compare(_find(rows, "reflow", "flow_euler", nfe),
                _find(rows, "flow_pairs", "flow_midpoint", 20),
                f"2-rectified flow (Euler, {nfe} NFE) vs the pairs' sampler (flow model, "
                f"midpoint, 20 NFE)")
        compare(_find(rows, "cd", "consistency", nfe), _find(rows, "diffusion", "ddim", nfe),
                f"consistency distillation vs its teacher (DDIM) at {nfe} NFE")
    teacher = _find(rows, "diffusion", "ddim", 50)
    cd2 = _find(rows, "cd", "consistency", 2)
    if teacher is not None and cd2 is not None:
        ratio = cd2["fid"] / teacher["fid"]
        if cd_ratio is None:
            what, verdict = f"ratio {ratio:.2f}", "met" if ratio <= 2 else "not met"
        else:
            what = (f"ratio {cd_ratio[0]:.2f} [{cd_ratio[1]:.2f}, {cd_ratio[2]:.2f}] "
                    "(95 % bootstrap over both sample sets)")
            verdict = ("met" if cd_ratio[2] <= 2 else "not met" if cd_ratio[1] > 2 else
                       "not decided: the interval contains 2")
        lines.append(f"- consistency distillation at 2 steps vs the teacher's DDIM at 50 NFE: "
                     f"{_cell(cd2)} vs {_cell(teacher)}, {what} (target <= 2: {verdict}).")
    return lines


def write(out: str, rows: list[dict], workdirs: dict[str, str], num_samples: int,
          cd_ratio=None) -> None:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                        for k in COLUMNS})
    nfes = sorted({r["nfe"] for r in rows})
    lines = ["# Flow matching vs diffusion on Fashion-MNIST, and few-step models", "",
             "Measured by `python -m experiments.flow_vs_diffusion.run` "
             f"(n = {num_samples} samples a row). FID in the shipped Fashion-MNIST "
             "classifier's features against the test split; [95 % bootstrap interval over "
             "the samples]. EMA parameters of each run's newest checkpoint.", "",
             "| model | workdir |", "|---|---|"]
    lines += [f"| {m}: {ARMS[m][0]} | `{w}` |" for m, w in workdirs.items()]
    lines += ["", "## FID by NFE", "",
              "| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|" + "---|" * len(nfes)]
    for model in workdirs:
        for sampler in dict.fromkeys(r["sampler"] for r in rows if r["model"] == model):
            cells = [_find(rows, model, sampler, n) for n in nfes]
            lines.append(f"| {model} | {sampler} | " + " | ".join(
                _cell(c) if c else "" for c in cells) + " |")
    lines += ["", "## Few steps", ""] + few_step_lines(rows, cd_ratio)
    if os.path.exists(ANALYTIC):
        with open(ANALYTIC) as f:
            analytic = f.read().split("\n", 1)[1]
        lines += ["", "## Exact ground truth: the same samplers on the VP and the "
                  "rectified-flow path (experiments/sampler_benchmark/gmm2d/vp_vs_flow.md)",
                  analytic]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> list[dict]:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    workdirs = {m: getattr(FLAGS, m) for m in ARMS if getattr(FLAGS, m)}
    if not workdirs:
        raise app.UsageError("give at least one of --" + ", --".join(ARMS))
    unknown = sorted(set(FLAGS.reuse) - set(workdirs))
    if unknown:
        raise app.UsageError(f"--reuse names {unknown}, which have no workdir flag; "
                             f"given: {sorted(workdirs)}")
    tables = {m: measure(m, w, FLAGS.out, FLAGS.num_samples, FLAGS.batch_size,
                         reuse=m in FLAGS.reuse)
              for m, w in workdirs.items()}
    rows = collect(tables)
    write(FLAGS.out, rows, workdirs, FLAGS.num_samples,
          cd_ratio_interval(FLAGS.out, workdirs.get("cd"), FLAGS.num_samples))
    return rows


if __name__ == "__main__":
    cli.run(main, FLAGS)
