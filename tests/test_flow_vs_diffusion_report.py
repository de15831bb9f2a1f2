"""experiments/flow_vs_diffusion: the tables it writes from the per-model fid_table
results (no sampling: the fid_table tool has its own tests)."""
import csv

from experiments.flow_vs_diffusion import run as study

HEADER = "sampler,options,nfe,num_samples,fid,fid_lo,fid_hi,is,precision,recall\n"


def _table(path, rows):
    path.write_text(HEADER + "".join(f"{s},,{n},100,{f},{lo},{hi},1,0.5,0.5\n"
                                     for s, n, f, lo, hi in rows))
    return str(path)


def test_results_combine_the_models_and_claim_only_disjoint_differences(tmp_path):
    tables = {
        "diffusion": _table(tmp_path / "d.csv", [("ddim", 1, 300, 290, 310),
                                                 ("ddim", 2, 120, 110, 130),
                                                 ("ddim", 50, 10, 9, 11)]),
        "flow": _table(tmp_path / "f.csv", [("flow_euler", 1, 200, 190, 210),
                                            ("flow_euler", 2, 125, 115, 135)]),
        "cd": _table(tmp_path / "c.csv", [("consistency", 2, 25, 23, 27)]),
    }
    rows = study.collect(tables)
    assert {r["model"] for r in rows} == set(tables) and len(rows) == 6
    study.write(str(tmp_path), rows, {m: f"runs/{m}" for m in tables}, 100)
    with open(tmp_path / "results.csv") as f:
        out = list(csv.DictReader(f))
    assert tuple(out[0]) == study.COLUMNS and len(out) == 6
    md = (tmp_path / "results.md").read_text()
    assert ("| diffusion | ddim | 300.00 [290.00, 310.00] | 120.00 [110.00, 130.00] | "
            "10.00 [9.00, 11.00] |") in md
    assert "| flow | flow_euler | 200.00 [190.00, 210.00] | 125.00 [115.00, 135.00] |  |" in md
    lines = study.few_step_lines(rows)
    assert any("at 1 NFE" in l and "lower, intervals disjoint" in l for l in lines)
    assert any("at 2 NFE" in l and "no difference claimed" in l and "flow" in l for l in lines)
    assert any("ratio 2.50 (target <= 2: not met)" in l for l in lines)
