"""Ship a trained stage as ``pretrained:NAME``: copy its model file into the package, measure it on the
held-out patients of its own dataset beside the mean-training-volume baseline, write the model card.

    python bench/ship_pretrained.py --name phantom-64 --run runs/p64/ship/base --data runs/p64/data \
        --command "bench/train_phantom64_base.sh runs/p64" --wall-time "31 min"
    python bench/ship_pretrained.py --name phantom-64-refiner --run runs/p64/ship/refine --data runs/p64/data \
        --command "bench/train_phantom64_refiner.sh runs/p64" --wall-time "11 min"

Writes ``ctrefine/pretrained/NAME.pt`` (the run's ``best_model.pt``, unchanged) and ``NAME.md`` (the
card: data, seed family, command, epochs, wall time, validation curve, test metrics with the mean
baseline, sha256), then prints the line to add to :data:`ctrefine.pretrained.SHIPPED`. Test metrics
come from ``ctrefine.infer.evaluate_dataset`` -- for a base with an untrained refiner (which returns the
coarse volume bit-for-bit), for a refiner on the frozen base its config names -- so the card's figures
are the ones every ctrefine report computes.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

import torch

from ctrefine import pretrained
from ctrefine.checkpoint import load_model_file
from ctrefine.data.io import read_json
from ctrefine.infer import evaluate_dataset
from ctrefine.models import build_refiner
from ctrefine.pipeline import TorchPredictor, TwoStage

MAX_BYTES = 10 * 2 ** 20  # what the repository takes per shipped file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--run", required=True, help="the stage folder: best_model.pt, val_log.csv, config.json")
    p.add_argument("--data", required=True, help="the dataset it was trained on (its test split is measured)")
    p.add_argument("--command", required=True, help="how the run was made, for the card")
    p.add_argument("--wall-time", required=True, help="wall time of the run, for the card")
    a = p.parse_args(argv)
    run, data = Path(a.run), Path(a.data)
    src = run / "best_model.pt"
    if src.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{src}: {src.stat().st_size / 2**20:.1f} MiB, more than the 10 MiB a shipped file may be")
    mf = load_model_file(src)
    cfg = mf.config
    torch.manual_seed(0)
    if mf.stage == "base":  # a fresh refiner returns the coarse volume exactly
        model = TwoStage(mf.build(), build_refiner(cfg)).eval()
        stages = ("mean", "coarse")
    else:
        base = load_model_file(cfg.model.base_model_checkpoint, stage="base")
        model = TwoStage(base.build(), mf.build()).eval()
        stages = ("mean", "coarse", "refined")
    with tempfile.TemporaryDirectory() as tmp:
        s = evaluate_dataset(TorchPredictor.from_model(model, cfg, device="cpu"), data, Path(tmp) / "r",
                             save_volumes=False, progress=False)
    header = read_json(data / "dataset.json")
    splits = read_json(data / "splits.json")
    with open(run / "val_log.csv") as f:
        val = list(csv.DictReader(f))
    score = "psnr" if mf.stage == "base" else "refined_psnr"
    best = max(val, key=lambda r: float(r[score]))
    dst = pretrained.ROOT / f"{a.name}.pt"
    shutil.copyfile(src, dst)
    digest = pretrained.sha256(dst)
    m = cfg.model

    def row(k, label, fmt="{:.2f}"):
        return "| " + label + " | " + " | ".join(f"{fmt.format(s[f'{st}_{k}_mean'])} ± {fmt.format(s[f'{st}_{k}_std'])}"
                                                 for st in stages) + " |"

    planned = (cfg.training.base_num_epochs or cfg.training.num_epochs) if mf.stage == "base" else cfg.training.num_epochs
    stopped = " (early stopping fired)" if len(val) < planned else " (the schedule ended; early stopping did not fire)"
    curve = ", ".join(f"{r['epoch']}: {float(r[score]):.2f}" for r in val[::max(1, len(val) // 12)])
    use = (f"`--set model.base_model_checkpoint=pretrained:{a.name}` (refine stage), `--base-checkpoint "
           f"pretrained:{a.name}` (infer, export-onnx)" if mf.stage == "base" else
           f"`--base-checkpoint {cfg.model.base_model_checkpoint} --refinement-checkpoint pretrained:{a.name}` "
           "(infer, export-onnx)")
    n_params = sum(v.numel() for v in mf.state_dict.values())
    if mf.stage == "base":
        title, what = "frozen base for the phantom domain", (
            f"stage 1 (`BaseReconstructor`, width {m.base_width}, {n_params:,} parameters): PA + lateral "
            f"radiographs {m.xray_size}² -> coarse CT {m.volume_size}³")
        columns = "| metric | mean training volume | this base (coarse) |\n|---|---|---|"
        verdict = f"Skill over the mean baseline: {s['coarse_skill_db_mean']:+.2f} ± {s['coarse_skill_db_std']:.2f} dB."
    else:
        title, what = f"refiner on `{cfg.model.base_model_checkpoint}`", (
            f"stage 2 (`DetailRefinementNetwork`, hidden {m.hidden_channels}, {n_params:,} parameters) trained on "
            f"the frozen base `{cfg.model.base_model_checkpoint}`: coarse CT {m.volume_size}³ + the same "
            f"radiographs {m.xray_size}² -> refined CT")
        columns = "| metric | mean training volume | coarse (base) | refined (this model) |\n|---|---|---|---|"
        verdict = (f"Refined - coarse: {s['gain_db_mean']:+.2f} ± {s['gain_db_std']:.2f} dB, refined better on "
                   f"{s['refined_wins']}/{s['num_patients']}; skill over the mean baseline {s['coarse_skill_db_mean']:+.2f} "
                   f"(coarse) -> {s['refined_skill_db_mean']:+.2f} dB (refined). Refined figures are after `infer`'s "
                   f"safety gate, which fell back to the coarse volume on {s['gate_fell_back']}/{s['num_patients']} "
                   f"({s['gate_psnr_change_db']:+.3f} dB); X-ray consistency {s['coarse_xray_consistency_mean']:.4f} "
                   f"(coarse) -> {s['refined_xray_consistency_mean']:.4f} (refined).")
    card = f"""# `pretrained:{a.name}` -- {title}

**What**: {what} over 320 mm
({320 / m.volume_size:g} mm voxels), model space `clip((HU + 1000) / 2500, 0, 1)`. fp32 weights with the
resolved config they were trained with (`ctrefine.checkpoint` model file). sha256 `{digest}`
({dst.stat().st_size / 2**20:.1f} MiB).

**Data**: {header.get('num_patients', len(splits['train']) + len(splits['val']) + len(splits['test']))}
procedural phantoms (`ctrefine make-data --num-patients {header.get('num_patients')} --seed {header.get('seed')} --size {m.volume_size}
--xray-size {m.xray_size}`, dataset format {header.get('version')}, {header.get('geometry', {}).get('kind', 'cone')}-beam DRRs),
split by patient: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])}. Seed family
{header.get('seed')}: disjoint from the demo's dataset (seed 0) and the shift-test sets (1001, 1002), so
their patients are unseen by this model.

**Training**: `{a.command}` -- the deepspeed launcher, 2 CPU ranks (gloo), ZeRO-2, bf16, batch
{cfg.training.batch_size} per rank, AdamW lr {cfg.training.learning_rate:g} with warm-up and cosine decay over
{planned} epochs, early stopping on val PSNR (patience
{cfg.training.early_stopping_patience}); ran {len(val)} epochs in {a.wall_time}{stopped}; best epoch {best['epoch']}
(val PSNR {float(best[score]):.2f} dB).
Val PSNR by epoch: {curve}.

**Test split** ({s['num_patients']} held-out patients; `python bench/ship_pretrained.py ...`):

{columns}
{row('psnr', 'PSNR (dB)')}
{row('ssim', 'SSIM', '{:.3f}')}
{row('hf_psnr', 'HF-PSNR (dB)')}
{row('band_high', 'band energy high', '{:.3f}')}
{row('bone_dice', 'bone Dice', '{:.3f}')}
{row('bone_edge_ratio', 'bone edge ratio', '{:.3f}')}

{verdict}

**Use**: {use}. **Limits**: phantoms only -- a real chest CT is out of its domain
(bench/RESULTS.md); radiographs must be rendered/normalised as ctrefine's DRRs.
"""
    (pretrained.ROOT / f"{a.name}.md").write_text(card)
    print(card)
    print(f'add to ctrefine/pretrained/__init__.py SHIPPED:  "{a.name}": ("{a.name}.pt", "{digest}"),')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
