"""The self-contained viewer: what it stores, its size, and what a real headless browser draws."""
import base64
import gzip
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from ctrefine.conventions import canonical_affine
from ctrefine.data.io import save_nifti
from ctrefine.data.phantoms import chest_phantom
from ctrefine.viewer import HU_STEP, PRESETS, STD_STEP, Case, dequantise, quantise_hu, viewer_html, window_gray

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def _payload(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="payload">(.*?)</script>', html, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def _unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(gzip.decompress(base64.b64decode(packed["data"])), np.uint8).reshape(packed["shape"])


def _cases(n: int, size: int = 64) -> list[Case]:
    out = []
    for seed in range(n):
        truth = chest_phantom(100 + seed, size)
        out.append(Case(f"patient_{seed:04d}", {"coarse": ndimage.gaussian_filter(truth, 1.5),
                                                 "refined": ndimage.gaussian_filter(truth, 0.8), "truth": truth},
                        (truth.sum(1), truth.sum(2)), {"refined psnr": 25.0 + seed, "gate": "refined kept"}))
    return out


def test_page_stores_every_layer_within_half_a_step_and_thirteen_patients_fit_in_5_mb():
    cases = _cases(13)
    html = viewer_html(cases, "t <b>")
    assert len(html.encode()) <= 5 * 2 ** 20, len(html.encode()) / 2 ** 20
    assert "<title>t &lt;b&gt;</title>" in html
    assert not re.search(r'<script[^>]+src=|<link[^>]+href=|https?://', html)  # nothing fetched from anywhere
    p = _payload(html)
    assert [c["name"] for c in p["cases"]] == [c.name for c in cases]
    got = dequantise(_unpack(p["cases"][3]["volumes"]["refined"]))
    want = np.clip(cases[3].volumes["refined"], -1000, 1500)
    assert np.abs(got - want).max() <= HU_STEP / 2 + 1e-3
    assert p["cases"][3]["metrics"] == {"refined psnr": 28.0, "gate": "refined kept"}
    assert len(p["cases"][0]["xrays"]) == 2
    # the uncertainty layer: sigma within half a step up to 255 steps, larger sigmas at the top step
    std = np.linspace(0.0, 1500.0, 64 ** 3, dtype=np.float32).reshape(64, 64, 64)
    p = _payload(viewer_html([Case("s", {"refined": cases[0].volumes["refined"], "uncertainty": std})]))
    got = _unpack(p["cases"][0]["volumes"]["uncertainty"]) * p["std_step"]
    inside = std <= 255 * STD_STEP
    assert np.abs(got - std)[inside].max() <= STD_STEP / 2 + 1e-3 and (got[~inside] == 255 * STD_STEP).all()
    with pytest.raises(Exception, match="differ in shape"):
        viewer_html([Case("x", {"coarse": np.zeros((4, 4, 4)), "truth": np.zeros((4, 4, 5))})])


@pytest.fixture(scope="module")
def browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no Chromium on this machine (make test installs chromium-headless-shell where apt-get can)")
    return found


def _selftest(browser, page, tmp_path):
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
                        "--virtual-time-budget=20000", "--dump-dom", f"{page.as_uri()}#selftest"],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="selftest">(.*?)</pre>', r.stdout, re.S)
    assert m, (r.returncode, r.stderr[-2000:])
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), r.stderr


def test_browser_draws_the_nifti_slice_under_the_window_and_the_slider_moves_it(browser, tmp_path):
    """`ctrefine view` on a NIfTI, opened in headless Chromium: no console errors, drawn within 2 s, and the
    axial plane's pixels are the NIfTI slice under the soft-tissue window, before and after a slider move."""
    vol = chest_phantom(7, 64)
    vol[:, :, :8] += 300.0  # an asymmetric mark: a flipped or transposed drawing cannot match
    path = tmp_path / "ct.nii.gz"
    save_nifti(path, vol, canonical_affine(64, 5.0))
    page = tmp_path / "v.html"
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "view", str(path), "--out", str(page)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out, stderr = _selftest(browser, page, tmp_path)
    assert out["errors"] == [] and "Uncaught" not in stderr, (out["errors"], stderr[-2000:])
    assert out["load_ms"] <= 2000 and out["layer"] == "volume"
    ww, wl = PRESETS["soft tissue"]
    assert (out["ww"], out["wl"]) == (ww, wl)
    assert out["second"]["slice"] == out["first"]["slice"] + 5
    for shot in (out["first"], out["second"]):
        drawn = np.frombuffer(base64.b64decode(shot["pixels"]), np.uint8).reshape(64, 64)
        stored = window_gray(dequantise(quantise_hu(vol[shot["slice"]])), ww, wl)
        assert np.abs(drawn.astype(int) - stored).max() <= 1  # the page draws what it stores ...
        exact = window_gray(vol[shot["slice"]], ww, wl)
        assert np.abs(drawn.astype(int) - exact).max() <= np.ceil(HU_STEP / 2 / ww * 255) + 1  # ... = the NIfTI
    assert out["first"]["pixels"] != out["second"]["pixels"]


def test_view_refuses_what_it_cannot_show(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "view", str(bad), "--out", str(tmp_path / "v.html")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a NIfTI file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "v.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "view", str(empty), "--out", str(tmp_path / "v.html")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds no volumes to view" in r.stderr
