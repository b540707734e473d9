"""``summary.md`` of a ``bench/gpu_check.sh`` results folder: every figure it measured, beside the GPU-speed
targets, with the device, date and commit it ran on. Only what the folder holds is written; a phase
that did not run or failed says so.

    python bench/gpu_summary.py /tmp/gcw/res ["TITLE"]     # writes /tmp/gcw/res/summary.md
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

TARGET_VPS = 300  # volumes/s through the launcher, both stages (one H200)
TARGET_BUSY = 80  # % of the wall time
TARGET_VAL_S_PER_100 = 2.0


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(rows, key) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (KeyError, TypeError, ValueError):
            pass
    return out


def busy_percent(path: Path) -> float | None:
    """Mean of nvidia-smi's utilization.gpu (the share of each sample period a kernel ran) over a run."""
    vals = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[1].replace(".", "", 1).isdigit():
            vals.append(float(parts[1]))
    return statistics.mean(vals) if vals else None


def _fmt(x, spec=".1f") -> str:
    return "—" if x is None else format(x, spec)


def step_section(res: Path) -> list[str]:
    path = res / "step" / "gpu_step.json"
    if not (res / "step.log").exists():
        return []
    if not path.exists():
        return ["## Isolated step", "", "not measured (see step.log)", ""]
    s = json.loads(path.read_text())
    lines = [f"## Isolated step ({s['preset']}, batch {s['batch']}, {s.get('dtype', 'bf16')}, no DeepSpeed)", "",
             "| stage / variant | step ms | volumes/s | first loss |", "|---|---|---|---|"]
    for k, v in s["steps"].items():
        lines.append(f"| {k} | {v['error']} | | |" if "error" in v else
                     f"| {k} | {v['step_ms']:.1f} | {v['volumes_per_s']:.1f} | {v['first_loss']:.5f} |")
    for stage in ("refine", "base"):
        p = s.get(f"profile_{stage}")
        if p:
            lines.append(f"\n{stage} profile (`kernels` variant): device time {p['device_time_ms_per_step']:.1f} ms a step, "
                         f"{p['kernel_launches_per_step']:.0f} launches a step, the project's Triton kernels "
                         f"{100 * p['own_kernel_share']:.1f} % of it (`step/profile_{stage}.txt`)")
    if "inference" in s:
        lines += ["", "| inference (base + refiner) | ms a batch | volumes/s |", "|---|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v['ms']:.2f} | {v['volumes_per_s']:.1f} |" for k, v in s["inference"].items()]
    return lines + [""]


def launcher_section(res: Path, n_val: int | None) -> list[str]:
    lines = ["## Through the deepspeed launcher", "",
             "| stage | volumes/s (median of logged steps after the first) | train s / epoch | val s / epoch | "
             "val s per 100 patients | GPU busy % |", "|---|---|---|---|---|---|"]
    for stage in ("base", "refine"):
        tr, va = _csv(res / f"{stage}_train_log.csv"), _csv(res / f"{stage}_val_log.csv")
        vps = _num(tr[1:] or tr, "volumes_per_s")
        val_s, train_s = _num(va, "val_s"), _num(va, "train_s")
        per100 = statistics.mean(val_s) * 100 / n_val if val_s and n_val else None
        lines.append(f"| {stage} | {_fmt(statistics.median(vps) if vps else None)} | "
                     f"{_fmt(statistics.mean(train_s) if train_s else None, '.2f')} | "
                     f"{_fmt(statistics.mean(val_s) if val_s else None, '.2f')} | {_fmt(per100, '.2f')} | "
                     f"{_fmt(busy_percent(res / f'busy_{stage}.csv'), '.0f')} |")
    return lines + [""]


def main(argv=None) -> int:
    argv = argv or sys.argv[1:]
    res, title = Path(argv[0]), (argv[1] if len(argv) > 1 else "ctrefine GPU check")
    env = (res / "env.txt").read_text().strip() if (res / "env.txt").exists() else "(no env.txt)"
    splits = res.parent / "data" / "splits.json"
    n_val = len(json.loads(splits.read_text()).get("val", [])) if splits.exists() else None
    lines = [f"# {title}", "", "```", env, "```", "", "## Timeline", "", "```",
             (res / "timeline.txt").read_text().strip() if (res / "timeline.txt").exists() else "", "```", ""]
    kt = (res / "kernel_tests.log")
    if kt.exists():
        lines += ["## Kernel tests", "", (kt.read_text().strip().splitlines() or ["(empty)"])[-1], ""]
    kb = res / "bench_kernels.json"
    if kb.exists():
        rows = json.loads(kb.read_text()).get("benchmarks", [])
        lines += ["## Kernel benchmark (mean ms)", "", "| benchmark | mean ms |", "|---|---|"]
        lines += [f"| {b['name']} | {1e3 * b['stats']['mean']:.3f} |" for b in rows] + [""]
    lines += step_section(res) + launcher_section(res, n_val)
    demo = res / "demo_metrics.txt"
    if (res / "demo.log").exists():
        lines += ["## Demo (the check's preset, small dataset; wall time in the timeline)", "", "```",
                  demo.read_text().strip() if demo.exists() else "no results (see demo.log)", "```", ""]
    for ev in sorted(res.glob("eval_*_metrics.txt")):  # bench/train_full.sh: the test split, every pair
        text = ev.read_text()
        table = text[text.find("test split"):] if "test split" in text else text
        lines += [f"## Evaluation: {ev.name[5:-12]} pair, test split", "", "```", table.strip(), "```", ""]
    lines += [f"Targets: each stage ≥ {TARGET_VPS} volumes/s through the launcher; GPU busy ≥ {TARGET_BUSY} %; "
              f"validation ≤ {TARGET_VAL_S_PER_100} s per 100 patients; loss kernels ≤ 5 % of a step.", ""]
    (res / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
