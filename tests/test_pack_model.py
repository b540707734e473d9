"""Half-precision model files and their transport in parts (bench/pack_model.py)."""
import sys
from pathlib import Path

import torch

from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.config import load_config
from ctrefine.models import build_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pack_model  # noqa: E402


def test_fp16_model_file_reads_back_as_fp32_and_travels_in_parts(tmp_path):
    cfg = load_config("cpu-small")
    torch.manual_seed(0)
    base, _ = build_models(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model_file(tmp_path / "base.pt", "base", base.state_dict(), cfg, {"psnr": 20.0}, epoch=3)
    parts = pack_model.split(tmp_path / "base.pt", tmp_path / "out" / "base", max_mib=0.5)
    assert len(parts) >= 2 and all(p.stat().st_size <= 2**19 for p in parts)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*(p.name for p in parts), "base.parts.json"])
    got = pack_model.join(tmp_path / "out" / "base.parts.json", tmp_path / "base_fp16.pt")
    assert got.stat().st_size < 0.6 * (tmp_path / "base.pt").stat().st_size  # fp16: about half
    mf = load_model_file(got, stage="base")
    assert all(v.dtype == torch.float32 for v in mf.state_dict.values() if v.is_floating_point())
    assert mf.metrics == {"psnr": 20.0} and mf.epoch == 3
    x = torch.rand(2, 2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, half = base.eval()(x), mf.build()(x)
    assert (ref - half).abs().max() < 5e-3  # fp16 weights: within the rounding of half precision
    (tmp_path / "out" / "base.part1").write_bytes(b"damaged")
    try:
        pack_model.join(tmp_path / "out" / "base.parts.json", tmp_path / "again.pt")
        raise AssertionError("a damaged part was accepted")
    except SystemExit as exc:
        assert "do not make the file" in str(exc)
    assert not (tmp_path / "again.pt").exists()
