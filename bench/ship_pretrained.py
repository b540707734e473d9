"""Ship a trained stage as ``pretrained:NAME``: copy its model file into the package (fp32, or fp16 read
back as fp32), measure it on the held-out patients of its own dataset beside the mean-training-volume
baseline, write the model card.

    python bench/ship_pretrained.py --name phantom-64-full --model base_fp16.pt --val-log base_val_log.csv \
        --data runs/full/data --command "bench/train_full.sh (run 2, bench/RESULTS-history.md section 12)" \
        --wall-time "124 s" --trained-on "the deepspeed launcher, one NVIDIA H200, ZeRO-2, bf16" --weights fp16
    python bench/ship_pretrained.py --name phantom-64-full-refiner --model refine_fp16.pt --base phantom-64-full ...

Writes ``ctrefine/pretrained/NAME.pt`` and ``NAME.md`` (the card: data, seed family, command, device,
epochs, wall time, validation curve, test metrics with the mean baseline and per structure, sha256),
then prints the line to add to :data:`ctrefine.pretrained.SHIPPED`. A refiner's config is made to name
its shipped base (``--base``), so the pair loads anywhere. Test metrics come from
``ctrefine.infer.evaluate_dataset`` -- for a base with an untrained refiner (which returns the coarse
volume bit-for-bit), for a refiner on its base -- so the card's figures are the ones every ctrefine
report computes.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch

from ctrefine import pretrained
from ctrefine.checkpoint import ModelFile, load_model_file, save_model_file
from ctrefine.jsonio import read_json
from ctrefine.infer import evaluate_dataset
from ctrefine.models import build_refiner
from ctrefine.pipeline import TorchPredictor, TwoStage
from ctrefine.uncertainty import build_head

MAX_MIB = {"fp32": 10, "fp16": 32}  # what the repository takes per shipped file
ROWS = (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("hf_psnr", "HF-PSNR (dB)", "{:.2f}"),
        ("band_high", "band energy high", "{:.3f}"), ("bone_dice", "bone Dice", "{:.3f}"),
        ("bone_edge_ratio", "bone edge ratio", "{:.3f}"), ("dice_vertebra", "vertebra Dice", "{:.3f}"),
        ("dice_rib", "rib Dice", "{:.3f}"), ("dice_vessel", "vessel Dice", "{:.3f}"),
        ("dice_airway", "airway Dice", "{:.3f}"), ("edge_vertebra", "vertebra edge ratio", "{:.3f}"),
        ("spine_profile_corr", "spine profile correlation", "{:.3f}"))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True, help="the stage's best_model.pt (or an fp16 copy of it)")
    p.add_argument("--val-log", required=True, help="the run's val_log.csv")
    p.add_argument("--data", required=True, help="the dataset it was trained on (its test split is measured)")
    p.add_argument("--base", default=None, help="refiner: the shipped base it was trained on (NAME, without pretrained:)")
    p.add_argument("--command", required=True, help="how the run was made, for the card")
    p.add_argument("--wall-time", required=True, help="wall time of the run, for the card")
    p.add_argument("--trained-on", default="the deepspeed launcher, 2 CPU ranks (gloo), ZeRO-2, bf16",
                   help="launcher, device and precision, for the card")
    p.add_argument("--weights", choices=tuple(MAX_MIB), default="fp32", help="precision the file is stored in")
    p.add_argument("--note", default="", help="a sentence for the card's training paragraph (e.g. where it started)")
    return p.parse_args(argv)


def measure(mf: ModelFile, data: Path) -> tuple[dict, tuple[str, ...]]:
    """The test split's summary through ``evaluate_dataset``, and the stages it reports."""
    cfg = mf.config
    torch.manual_seed(0)
    if mf.stage == "base":  # a fresh refiner returns the coarse volume exactly
        model, stages = TwoStage(mf.build(), build_refiner(cfg)).eval(), ("mean", "coarse")
    else:
        base = load_model_file(cfg.model.base_model_checkpoint, stage="base")
        head, cal = build_head(mf.uncertainty, str(mf.path))  # measured with the card's figures when there is one
        model, stages = TwoStage(base.build(), mf.build(), head, cal).eval(), ("mean", "coarse", "refined")
    with tempfile.TemporaryDirectory() as tmp:
        s = evaluate_dataset(TorchPredictor.from_model(model, cfg, device="cpu"), data, Path(tmp) / "r",
                             save_volumes=False, progress=False, figures=0)
    return s, stages


def table(s: dict, stages) -> str:
    head = {"base": "| metric | mean training volume | this base (coarse) |\n|---|---|---|",
            "refine": "| metric | mean training volume | coarse (base) | refined (this model) |\n|---|---|---|---|"}
    lines = [head["base" if len(stages) == 2 else "refine"]]
    for key, label, fmt in ROWS:
        if f"coarse_{key}_mean" in s:
            lines.append(f"| {label} | " + " | ".join(f"{fmt.format(s[f'{st}_{key}_mean'])} ± "
                                                     f"{fmt.format(s[f'{st}_{key}_std'])}" for st in stages) + " |")
    return "\n".join(lines)


def verdict(s: dict, stage: str) -> str:
    if stage == "base":
        return f"Skill over the mean baseline: {s['coarse_skill_db_mean']:+.2f} ± {s['coarse_skill_db_std']:.2f} dB."
    return (f"Refined - coarse: {s['gain_db_mean']:+.2f} ± {s['gain_db_std']:.2f} dB, refined better on "
            f"{s['refined_wins']}/{s['num_patients']}; skill over the mean baseline {s['coarse_skill_db_mean']:+.2f} "
            f"(coarse) -> {s['refined_skill_db_mean']:+.2f} dB (refined). Refined figures are after `infer`'s "
            f"safety gate, which fell back to the coarse volume on {s['gate_fell_back']}/{s['num_patients']} "
            f"({s['gate_psnr_change_db']:+.3f} dB); X-ray consistency {s['coarse_xray_consistency_mean']:.4f} "
            f"(coarse) -> {s['refined_xray_consistency_mean']:.4f} (refined).")


def uncertainty_line(mf: ModelFile, s: dict) -> str:
    if not mf.uncertainty or "uncertainty_coverage90" not in s:
        return ""
    u = mf.uncertainty
    return (f"\n\n**Uncertainty** (`ctrefine.uncertainty`, trained and calibrated by `bench/fit_uncertainty.py`): "
            f"a {u['channels']}-channel head trained on {u['train_patients']} training patients' errors for "
            f"{u['epochs']} epochs (class weight frequency^-{u['class_power']:g}), scaled x{u['scale']:.3f} on the val "
            f"split. On the test split: 90 % interval coverage {s['uncertainty_coverage90']:.3f}, "
            f"voxel rank correlation of sigma with |error| {s['uncertainty_spearman_voxel']:.3f}, patient rank "
            f"correlation of mean sigma with PSNR {s.get('uncertainty_spearman_patient_psnr', float('nan')):.3f}.")


def card(a, mf: ModelFile, s: dict, stages, val: list[dict], dst: Path, digest: str) -> str:
    cfg, m, data = mf.config, mf.config.model, Path(a.data)
    header, splits = read_json(data / "dataset.json"), read_json(data / "splits.json")
    score = "psnr" if mf.stage == "base" else "refined_psnr"
    best = max(val, key=lambda r: float(r[score]))
    t = cfg.training
    planned = (t.base_num_epochs or t.num_epochs) if mf.stage == "base" else t.num_epochs
    budget = f", `training.time_budget_s` {t.time_budget_s:g} s" if t.time_budget_s else ""
    curve = ", ".join(f"{r['epoch']}: {float(r[score]):.2f}" for r in val[::max(1, len(val) // 12)])
    n_params = sum(v.numel() for v in mf.state_dict.values())
    if mf.stage == "base":
        title = "frozen base for the phantom domain"
        what = (f"stage 1 (`BaseReconstructor`, width {m.base_width}, {n_params:,} parameters): PA + lateral "
                f"radiographs {m.xray_size}² -> coarse CT {m.volume_size}³")
        use = f"`--base-checkpoint pretrained:{a.name}` (infer, export-onnx), `--set model.base_model_checkpoint=pretrained:{a.name}` (refine stage)"
    else:
        title = f"refiner on `{cfg.model.base_model_checkpoint}`"
        what = (f"stage 2 (`DetailRefinementNetwork`, hidden {m.hidden_channels}, {n_params:,} parameters) trained on "
                f"the frozen base `{cfg.model.base_model_checkpoint}`: coarse CT {m.volume_size}³ + the same "
                f"radiographs {m.xray_size}² -> refined CT")
        use = f"`--base-checkpoint {cfg.model.base_model_checkpoint} --refinement-checkpoint pretrained:{a.name}` (infer, export-onnx)"
    weights = "fp16 weights, read back as fp32," if a.weights == "fp16" else "fp32 weights"
    return f"""# `pretrained:{a.name}` -- {title}

**What**: {what} over 320 mm ({320 / m.volume_size:g} mm voxels), model space `clip((HU + 1000) / 2500, 0, 1)`.
{weights} with the resolved config they were trained with (`ctrefine.checkpoint` model file).
sha256 `{digest}` ({dst.stat().st_size / 2**20:.1f} MiB).

**Data**: {header.get('num_patients')} procedural phantoms (`ctrefine make-data --num-patients {header.get('num_patients')}
--seed {header.get('seed')} --size {m.volume_size} --xray-size {m.xray_size}`, dataset format {header.get('version')},
phantom version {header.get('phantom_version', 2)},
{header.get('geometry', {}).get('kind', 'cone')}-beam DRRs), split by patient: train {len(splits['train'])}, val
{len(splits['val'])}, test {len(splits['test'])}. Seed family {header.get('seed')}: disjoint from the demo's dataset
(seed 0) and the shift-test sets (1001, 1002), so their patients are unseen by this model.

**Training**: `{a.command}` -- {a.trained_on}, batch {t.batch_size} per rank, AdamW lr {t.learning_rate:g} with
warm-up and cosine decay over at most {planned} epochs{budget}, early stopping on val PSNR (patience
{t.early_stopping_patience}); ran {len(val)} epochs in {a.wall_time}; best epoch {best['epoch']} (val PSNR
{float(best[score]):.2f} dB). Val PSNR by epoch: {curve}. {a.note}

**Test split** ({s['num_patients']} held-out patients; `python bench/ship_pretrained.py ...`; structure Dice
as `ctrefine.metrics.STRUCTURES` defines the predicted mask):

{table(s, stages)}

{verdict(s, mf.stage)}{uncertainty_line(mf, s)}

**Use**: {use}. **Limits**: phantoms only -- a real chest CT is out of its domain
(bench/RESULTS.md); radiographs must be rendered/normalised as ctrefine's DRRs.
"""


def main(argv=None) -> int:
    a = parse(argv)
    mf = load_model_file(a.model)
    cfg = mf.config
    if a.base:
        if mf.stage != "refine":
            raise SystemExit("--base is for a refiner")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"base_model_checkpoint": pretrained.PREFIX + a.base})})
    dst = pretrained.ROOT / f"{a.name}.pt"
    save_model_file(dst, mf.stage, mf.state_dict, cfg, mf.metrics, mf.epoch, mf.global_step, weights=a.weights,
                    uncertainty=mf.uncertainty)
    if dst.stat().st_size > MAX_MIB[a.weights] * 2**20:
        dst.unlink()
        raise SystemExit(f"{a.model}: more than the {MAX_MIB[a.weights]} MiB a shipped {a.weights} file may be")
    mf = load_model_file(dst)
    s, stages = measure(mf, Path(a.data))
    with open(a.val_log) as f:
        val = list(csv.DictReader(f))
    digest = pretrained.sha256(dst)
    text = card(a, mf, s, stages, val, dst, digest)
    (pretrained.ROOT / f"{a.name}.md").write_text(text)
    print(text)
    print(f'add to ctrefine/pretrained/__init__.py SHIPPED:  "{a.name}": ("{a.name}.pt", "{digest}"),')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
