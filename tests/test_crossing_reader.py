"""ctrefine.models.crossing_reader: both views' neighbourhoods read together at each voxel."""
import torch

from ctrefine.models.crossing_reader import CrossingReader


def _reader() -> CrossingReader:
    torch.manual_seed(0)
    reader = CrossingReader(cues=2, out_channels=3).eval()
    with torch.no_grad():  # a trained reader: the zero last layer would make every test trivial, and the default
        reader.read[-1].weight.normal_(0, 0.5)  # initialisation keeps the SiLUs near their linear range
        for p in reader.parameters():
            p.mul_(3.0)
    return reader


def test_an_untrained_reader_adds_nothing():
    pa, lat = torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16)
    out = CrossingReader(cues=2, out_channels=3)(pa, lat)
    assert out.shape == (1, 3, 16, 16, 16) and not out.any()


def test_the_reading_is_not_a_sum_of_one_reading_per_view():
    """The plain lifting adds what each view says; a vessel and a ghost differ only in how the two go together.
    Swapping the lateral neighbourhood between two PA neighbourhoods changes a joint reading:
    f(a, b) + f(a', b') != f(a, b') + f(a', b)."""
    g = torch.Generator().manual_seed(1)
    a, a2, b, b2 = (torch.rand(1, 2, 16, 16, generator=g) for _ in range(4))
    reader = _reader()
    with torch.no_grad():
        mixed = reader(a, b) + reader(a2, b2) - reader(a, b2) - reader(a2, b)
    assert float(mixed.abs().mean()) > 1e-2 * float(reader(a, b).abs().mean())


def test_each_voxel_reads_its_own_pa_and_lateral_neighbourhood():
    """A change on the PA radiograph at (height d, width w) reaches the voxels of that PA ray (any depth) within
    the neighbourhood's reach, and no voxel of a height far from d."""
    reader = _reader()
    pa, lat = torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32)
    pa2 = pa.clone()
    pa2[0, :, 16, 10] += 1.0
    with torch.no_grad():
        diff = (reader(pa2, lat) - reader(pa, lat)).abs().sum(1)[0]  # (D, H, W)
    assert float(diff[16, :, 10].min()) > 0  # every depth of the ray
    assert float(diff[:16 - 8].max()) == 0 and float(diff[16 + 8:].max()) == 0  # reach: 7 pixels each way


def test_the_vessel_logit_is_kept_in_training_only_and_the_loss_term_reaches_the_reader():
    """crossing_logits(): the reader's vessel logits of the last training pass (None in eval mode, or without a
    reader); the crossing_bce term's gradient reaches the reader's 2D descriptors, and an untrained reader's volume
    is the same whatever the logit says."""
    from ctrefine.config import load_config
    from ctrefine.losses.loss import DetailRefinementLoss
    from ctrefine.models import build_refiner

    cfg = load_config("cpu-small", ["model.hidden_channels=8", "model.guidance_channels=4", "model.mid_blocks=1",
                                    'model.guidance_crossing="mlp"'])
    torch.manual_seed(0)
    net = build_refiner(cfg)
    c, x = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 2, 1, 64, 64)
    refined = net.train()(c, x)
    logits = net.crossing_logits()
    assert logits.shape == (1, 1, 32, 32, 32)
    truth = c.clone()
    truth[..., 8:24, 8:24] = 0.1  # lung
    truth[..., 12, 12] = truth[..., 18, 18] = 0.55  # two vessels: two ghosts
    loss = DetailRefinementLoss({"crossing_bce": 1.0})
    total, terms = loss(refined, truth, c, x, None, logits)
    assert terms["crossing_bce"].item() > 0
    total.backward()
    assert float(net.guidance.crossing.describe["pa"][0].weight.grad.abs().max()) > 0
    net.eval()(c, x)
    assert net.crossing_logits() is None
    assert build_refiner(load_config("cpu-small", ["model.hidden_channels=8"])).crossing_logits() is None


def test_pretraining_teaches_the_reader_alone_and_leaves_the_volume(tmp_path, tiny_dataset, random_pair):
    """bench/pretrain_crossing_reader.py: its logits gathered at the crossings are the reader's own 3D logits there;
    it changes the reader's descriptors, not the refined volume, and writes a file a leg can start from."""
    import sys
    from pathlib import Path

    from ctrefine.checkpoint import load_model_file
    from ctrefine.data.dataset import CTDataset

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    import pretrain_crossing_reader as pre
    import widen_refiner

    assert widen_refiner.main([str(random_pair[1]), str(tmp_path / "read.pt"), "--crossing-reader"]) == 0
    src = load_model_file(tmp_path / "read.pt", stage="refine").build()
    ds = CTDataset(tiny_dataset, "train", cache=False)
    p = max((pre.patient_crossings(ds, i, src.guidance) for i in range(len(ds))), key=lambda q: len(q["y"]))
    assert len(p["y"]) > 0
    reader = src.guidance.crossing.train()
    reader(p["pa"], p["lateral"])
    d, h, w = p["idx"].T
    with torch.no_grad():
        torch.testing.assert_close(pre.logits(reader, p), reader.last_logits[0, 0, d, h, w], rtol=1e-4, atol=1e-5)
    assert pre.main([str(tmp_path / "read.pt"), str(tmp_path / "taught.pt"), "--data", str(tiny_dataset),
                     "--epochs", "1", "--batch", "2"]) == 0
    taught = load_model_file(tmp_path / "taught.pt", stage="refine").build().eval()
    before = src.eval()
    assert not torch.equal(taught.guidance.crossing.describe["pa"][0].weight, before.guidance.crossing.describe["pa"][0].weight)
    c, x = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(taught(c, x), before(c, x), rtol=0, atol=0)
