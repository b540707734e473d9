"""The relay of GPU windows that trains the mission's `full` pair: its stored state and its log.

Every lent GPU window continues the last one (``make gpu-window`` = ``bench/train_full.sh``): it joins the
relay's model files from ``relay/`` (fp16 parts, :mod:`pack_model`), starts each stage from them (a warm
restart: the weights carry over; AdamW's moments and the cosine schedule start afresh with a short warm-up,
which costs a few steps and keeps what comes back small), trains on *new* phantoms of the relay's seed family
(window ``k`` draws seeds :func:`window_seeds`), evaluates on the fixed held-out set (the same patients every
window: :data:`HELDOUT_SEED`), and returns the new parts and the log with this window's record appended.
The session that ran it commits ``relay/``.

    python bench/relay.py window relay/                       # the next window's index (0 for none yet)
    python bench/relay.py seeds relay/                        # "BASE_SEED REFINE_SEED" of the next window
    python bench/relay.py record RES_DIR relay/ OUT/relay     # OUT/relay/relay_log.json = old log + this window
    python bench/relay.py show relay/                         # the log as a table (the curve window by window)

The record holds the device, date, commit, wall seconds, each stage's epochs, steps, volumes seen and
validation curve, and the held-out figures of the relay pair beside the mean training volume and the shipped
narrow pair on the same patients (PSNR, HF-PSNR, high-band energy ratio, bone Dice).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

LOG = "relay_log.json"
HELDOUT_SEED = 2999  # the fixed held-out set of every window (not a seed any training window draws)
SEED_FAMILY = 3000  # window k trains the base on seed 3000 + 2k, the refiner on 3000 + 2k + 1: new patients
FIGURES = ("psnr", "hf_psnr", "band_high", "bone_dice")


def read_log(relay: Path) -> list[dict]:
    path = Path(relay) / LOG
    if not path.is_file():
        return []
    log = json.loads(path.read_text())
    if not isinstance(log, list):
        raise SystemExit(f"{path}: not a relay log (a JSON list of windows)")
    return log


def window_seeds(window: int) -> tuple[int, int]:
    """The dataset seeds of window ``window``: the base's patients, the refiner's patients."""
    return SEED_FAMILY + 2 * window, SEED_FAMILY + 2 * window + 1


def _stage(res: Path, stage: str) -> dict | None:
    """Epochs, steps, volumes seen and the validation curve of one stage's logs in the results folder."""
    val, train = res / f"{stage}_val_log.csv", res / f"{stage}_train_log.csv"
    if not val.is_file():
        return None
    with open(val) as f:
        rows = list(csv.DictReader(f))
    score = "psnr" if stage == "base" else "refined_psnr"
    curve = [round(float(r[score]), 3) for r in rows if r.get(score)]
    batch = 1
    cfg = res / f"{stage}_config.json"
    if cfg.is_file():
        batch = json.loads(cfg.read_text())["training"]["batch_size"]
    steps = int(rows[-1]["step"]) if rows else 0
    out = {"epochs": len(rows), "steps": steps, "volumes_seen": steps * batch, "val_curve": curve,
           "best_val": max(curve) if curve else None,
           "train_s": round(sum(float(r["train_s"]) for r in rows), 1)}
    if train.is_file():
        with open(train) as f:
            vps = [float(r["volumes_per_s"]) for r in csv.DictReader(f) if r.get("volumes_per_s")]
        out["volumes_per_s_median"] = sorted(vps)[len(vps) // 2] if vps else None
    return out


def _heldout(res: Path, name: str) -> dict | None:
    """Mean / coarse / refined figures of an evaluation on the held-out set."""
    path = res / f"eval_{name}_metrics.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())["summary"]
    return {who: {f: s.get(f"{who}_{f}_mean") for f in FIGURES} for who in ("mean", "coarse", "refined")
            if f"{who}_psnr_mean" in s} | {"patients": s.get("coarse_psnr_n")}


def record(res: Path, relay_in: Path, relay_out: Path) -> dict:
    """Append this window's record (from the results folder ``res``) to the log; write it to ``relay_out``."""
    log = read_log(relay_in)
    env = (res / "env.txt").read_text().splitlines() if (res / "env.txt").is_file() else []
    timeline = (res / "timeline.txt").read_text().splitlines() if (res / "timeline.txt").is_file() else []
    wall = int(timeline[-1].split("s]")[0].lstrip("[")) if timeline and timeline[-1].startswith("[") else None
    window = len(log)
    rec = {"window": window, "seeds": list(window_seeds(window)), "heldout_seed": HELDOUT_SEED, "env": env,
           "wall_s": wall, "base": _stage(res, "base"), "refine": _stage(res, "refine"),
           "heldout": {"relay": _heldout(res, "full"), "narrow": _heldout(res, "narrow")}}
    seen = [w.get(s, {}) or {} for w in log + [rec] for s in ("base", "refine")]
    rec["volumes_seen_total"] = sum(s.get("volumes_seen", 0) for s in seen)
    relay_out.mkdir(parents=True, exist_ok=True)
    (relay_out / LOG).write_text(json.dumps(log + [rec], indent=1))
    return rec


def show(relay: Path) -> str:
    rows = ["| window | device | base epochs (val PSNR) | refine epochs (val PSNR) | held-out mean / coarse / refined "
            "PSNR | narrow coarse / refined | volumes seen |", "|---|---|---|---|---|---|---|"]
    for w in read_log(relay):
        h, n = (w.get("heldout") or {}).get("relay") or {}, (w.get("heldout") or {}).get("narrow") or {}
        psnr = lambda d, k: f"{d[k]['psnr']:.2f}" if d.get(k) and d[k].get("psnr") is not None else "-"  # noqa: E731
        st = lambda s: f"{s['epochs']} ({s['best_val']})" if s else "-"  # noqa: E731
        device = next((ln for ln in w.get("env", []) if "device" in ln), "?").split("device")[-1].strip()
        rows.append(f"| {w['window']} | {device} | {st(w.get('base'))} | {st(w.get('refine'))} | "
                    f"{psnr(h, 'mean')} / {psnr(h, 'coarse')} / {psnr(h, 'refined')} | "
                    f"{psnr(n, 'coarse')} / {psnr(n, 'refined')} | {w.get('volumes_seen_total')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("window", "seeds", "show"):
        sub.add_parser(name).add_argument("relay", type=Path)
    r = sub.add_parser("record")
    r.add_argument("res", type=Path)
    r.add_argument("relay", type=Path)
    r.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "window":
        print(len(read_log(a.relay)))
    elif a.cmd == "seeds":
        print(*window_seeds(len(read_log(a.relay))))
    elif a.cmd == "show":
        print(show(a.relay))
    else:
        rec = record(a.res, a.relay, a.out)
        print(f"window {rec['window']}: volumes seen in all windows {rec['volumes_seen_total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
