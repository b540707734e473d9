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
