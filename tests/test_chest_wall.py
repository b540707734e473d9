"""The chest-wall cue (ctrefine.models.chest_wall): where along a ray the radiographs' rib detail can lie."""
import sys
from pathlib import Path

import pytest
import torch

from ctrefine.conventions import hu_to_model
from ctrefine.anatomy import shell_voxels
from ctrefine.models.chest_wall import ChestWallCue
from ctrefine.reprojection import SliceProjector

N = 32


def _chest() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A soft-tissue elliptic cylinder (air around it) holding a lung: ``(volume, body mask, lung mask)``."""
    d, h, w = torch.meshgrid(*(torch.arange(N, dtype=torch.float32),) * 3, indexing="ij")
    body = ((h - 15.5) / 12) ** 2 + ((w - 15.5) / 14) ** 2 <= 1
    lung = body & (((h - 15.5) / 5) ** 2 + ((w - 15.5) / 6) ** 2 <= 1) & (d > 4) & (d < N - 5)
    vol = torch.where(body, hu_to_model(torch.tensor(0.0)), torch.tensor(0.0))
    vol = torch.where(lung, hu_to_model(torch.tensor(-850.0)), vol)
    return vol[None, None], body[None, None], lung[None, None]


def test_depth_distance_and_gated_detail_on_a_synthetic_chest():
    vol, body, lung = _chest()
    xrays = torch.zeros(1, 2, 1, N, N)
    xrays[:, 0, :, 12:15, :] = 1.0  # a rib's shadow on the PA view: a horizontal band, rows 12-14 (D)
    vol.requires_grad_(True)
    cue = ChestWallCue()(vol, xrays, SliceProjector(N, N, "cone"))
    assert cue.shape == (1, 4, N, N, N) and not cue.requires_grad
    depth, to_lung, pa, lat = cue[0]
    body, lung = body[0, 0], lung[0, 0]
    shell = shell_voxels(N)
    assert shell == 4  # 40 mm at 10 mm voxels
    assert depth[~body].abs().max() == 0 and depth[body].min() == 1 / shell  # the skin is one erosion deep
    assert depth[body].max() == 1.0  # counted up to the shell
    assert to_lung[lung].abs().max() == 0 and to_lung[body & ~lung].min() > 0
    # the band's edges land in the wall at their heights, nowhere outside the body or deeper than the shell
    assert pa[~body].abs().max() == 0 and pa[depth == 1.0].abs().max() == 0
    wall = body & (depth < 1.0)
    assert pa[11:16][wall[11:16]].abs().mean() > 0.1
    assert pa[20:][wall[20:]].abs().max() < 1e-6  # rows far from the band: no detail
    assert lat.abs().max() < 1e-6  # a blank lateral view has no edges to place


def test_refiner_with_the_cue_starts_at_the_coarse_volume_and_learns_from_it():
    from ctrefine.models.refiner import DetailRefinementNetwork

    net = DetailRefinementNetwork(16, 8, 4, 4, 1, "cone", data_consistency_steps=2, dc_weighting="density",
                                  residual_fusion="views+product", wall_cue="depth+detail")
    assert net.stem[0].in_channels == 2 + 4 + 3 + 4  # coarse, high-pass, guidance, residuals, the cue
    c, x = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 2, 1, 32, 32)
    out = net(c, x)
    assert torch.equal(out, c)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.02)
    net(c, x).sum().backward()
    assert net.stem[0].weight.grad[:, -4:].abs().sum() > 0  # the cue's channels are read
    with pytest.raises(ValueError, match="chest-wall cue needs a re-projection"):
        DetailRefinementNetwork(16, 8, 4, 4, 1, "off", wall_cue="depth+detail")
    with pytest.raises(ValueError, match="wall_cue must be"):
        DetailRefinementNetwork(16, 8, 4, 4, 1, "cone", wall_cue="ribs")


def test_the_cue_exports_to_onnx_and_runs_there_as_in_torch(tmp_path):
    """CumSum, MaxPool and the back-projection: the cue's graph is one every ONNX runtime reads, same values."""
    import onnxruntime as ort

    from ctrefine.export import OPSET

    class Cue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector, self.cue = SliceProjector(N, N, "cone"), ChestWallCue()

        def forward(self, volume, xrays):
            return self.cue(volume, xrays, self.projector)

    vol = _chest()[0]
    xrays = torch.rand(1, 2, 1, N, N, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cue.onnx"
    torch.onnx.export(Cue().eval(), (vol, xrays), str(path), dynamo=True, opset_version=OPSET,
                      input_names=["volume", "xrays"], output_names=["cue"])
    got = ort.InferenceSession(str(path)).run(None, {"volume": vol.numpy(), "xrays": xrays.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), Cue()(vol, xrays), rtol=1e-5, atol=1e-5)
