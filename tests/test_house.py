"""The shape of the package, and what moved in the house issue: floors, config, model files, CLI errors."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctrefine.checkpoint import load_model_file, save_model_file, state_fingerprint
from ctrefine.config import Config, ConfigError, ds_config_path, load_config, preset_names, resolve
from ctrefine.errors import DataError, UserError
from ctrefine.losses.loss import DetailRefinementLoss
from ctrefine.losses.registry import DEFAULT_WEIGHTS, TERMS
from ctrefine.models import build_models

PKG = Path(__file__).resolve().parents[1] / "ctrefine"


def _imports(path: Path) -> set[str]:
    """ctrefine modules a file imports (relative imports resolved), e.g. {'ctrefine.pipeline', ...}."""
    mod = "ctrefine." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("ctrefine"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ctrefine"))
    return out


def _group(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def test_training_export_inference_are_siblings():
    groups = {"training": PKG.glob("training/*.py"), "train": [PKG / "train.py"], "export": [PKG / "export.py"],
              "infer": [PKG / "infer.py"]}
    family = {"training": "train", "train": "train", "export": "export", "infer": "infer"}
    for g, files in groups.items():
        for f in files:
            for name in _imports(f):
                top = name.split(".")[1] if "." in name else ""
                if top in family and family[top] != family[g]:
                    pytest.fail(f"{f.name} ({g}) imports {name}")


# Every room of the package (a top-level module, or a sub-package) on its floor, lowest first: a room imports
# only rooms on lower floors (lazy imports inside functions included). docs/architecture.md shows this table.
FLOORS = [
    ["errors", "conventions", "fourier", "stencil", "kernels", "presets"],
    ["outputs", "device", "reprojection", "anatomy"],
    ["jsonio", "metrics", "pretrained", "models", "losses"],
    ["config", "data"],
    ["engines", "uncertainty", "checkpoint", "report", "viz", "viewer"],
    ["quantize", "pipeline"],
    ["training", "infer", "export"],
    ["api", "launch"],
    ["cli"],
    ["train"],
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def _room(module: str) -> str:
    return module.split(".")[1]


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports. The package's own ``__init__`` (its
    version and the lazy door to :mod:`ctrefine.api`) is the front door, outside the floors."""
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            mods["ctrefine." + ".".join(parts)] = path
    return {m: {n for n in _imports(p) if n in mods and n != m} for m, p in mods.items()}


def _doc_table(doc: Path, marker: str) -> list[list[str]]:
    """The rows (cells, backticks stripped) of the markdown table between ``<!-- marker`` and ``<!-- end marker``."""
    text = doc.read_text()
    body = text[text.index(f"<!-- {marker}"):text.index(f"<!-- end {marker}")]
    rows = [ln.strip().strip("|").split("|") for ln in body.splitlines() if ln.startswith("|")][2:]
    return [[c.strip().replace("`", "") for c in r] for r in rows]


def test_the_docs_floor_table_is_the_tests():
    rows = _doc_table(PKG.parent / "docs" / "architecture.md", "floors")
    assert {int(f): sorted(r.strip() for r in rooms.split(",")) for f, rooms in rows} == \
        {i: sorted(rooms) for i, rooms in enumerate(FLOORS)}


def test_floor_table():
    graph = _module_graph()
    assert sorted({_room(m) for m in graph}) == sorted(FLOOR), "a room without a floor, or a floor without a room"
    up = [f"{m} -> {n}" for m, deps in graph.items() for n in deps
          if _room(n) != _room(m) and FLOOR[_room(n)] >= FLOOR[_room(m)]]
    assert not up, up
    # no cycle inside a room either (depth-first search over the module graph)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_cli_module_only_parses():
    tree = ast.parse((PKG / "cli.py").read_text())
    top_imports = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top_from = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top_imports <= {"argparse", "sys"} and top_from <= {"__future__", "errors", "outputs"}
    # the commands delegate: no loop, no file handling, no reductions of their own in any `_cmd_*` function
    for f in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_cmd_")):
        work = [type(n).__name__ for n in ast.walk(f) if isinstance(n, (ast.For, ast.While, ast.With, ast.comprehension))]
        calls = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not work and not calls & {"open", "sum", "max", "min"}, (f.name, work, calls)
    # what the CLI imports at parse time stays light: outputs.py (a default shown in --help) needs only the stdlib
    out = ast.parse((PKG / "outputs.py").read_text())
    ours = {n.module for n in out.body if isinstance(n, ast.ImportFrom) and n.level}
    theirs = {a.name.split(".")[0] for n in out.body if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in out.body if isinstance(n, ast.ImportFrom) and not n.level}
    assert ours <= {"errors"} and not theirs & {"torch", "numpy", "scipy"}


def test_one_device_policy():
    """Only ctrefine/device.py asks torch whether there is a GPU or reads CTREFINE_KERNELS: every other module
    gets those decisions from it."""
    asking = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name != "device.py" or p.parent != PKG
              if "cuda.is_available" in p.read_text() or "CTREFINE_KERNELS\"" in p.read_text()
              or "'CTREFINE_KERNELS'" in p.read_text() or "cuda.device_count" in p.read_text()]
    assert asking == [], asking


def test_one_parser():
    """Every command-line option of the package is parsed in cli.py (train's too: ``python -m ctrefine.train``
    and the deepspeed launcher go through it); its stage choices are the driver's stages."""
    from ctrefine.cli import build_parser
    from ctrefine.training.stages import STAGES

    makers = []
    for path in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) in (
                    "ArgumentParser", "OneLineParser"):
                makers.append(f"{path.relative_to(PKG)}:{n.lineno}")
    assert len(makers) == 1 and makers[0].startswith("cli.py:"), makers
    a = build_parser().parse_args(["train", "refine", "--config", "cpu-small", "--stop-after-epochs", "2"])
    assert a.stage == "refine" and a.stop_after_epochs == 2 and a.func.__name__ == "_cmd_train"
    sub = next(x for x in build_parser()._actions if x.dest == "command").choices["train"]
    assert next(x for x in sub._actions if x.dest == "stage").choices == tuple(STAGES)


# ------------------------------------------------------------------------------------------- config
MAX_FUNCTION_LINES = 80


def test_no_function_over_80_lines():
    """Every function in the package and the kernels reads on one screen or two (a longer one is a
    pipeline of named steps, like data/phantoms.py's ANATOMY)."""
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_loss_registry_is_the_one_source():
    assert Config().loss_weights() == DEFAULT_WEIGHTS == {n: t.default_weight for n, t in TERMS.items()}
    assert DetailRefinementLoss().weights == DEFAULT_WEIGHTS
    seed = {"l1": 1.0, "frequency": 0.5, "gradient": 0.3, "texture": 0.2, "consistency": 0.1}
    assert {k: DEFAULT_WEIGHTS[k] for k in seed} == seed  # the seed's five keep the seed's weights
    assert set(DEFAULT_WEIGHTS) - set(seed) == {"mse", "lung_mse", "lung_rim_mse", "lung_detail_mse", "soft_l1",
                                                "xray_consistency", "band_energy", "gradient_distribution", "streak",
                                                "streak_match", "lung_streak_match", "placement", "adversarial",
                                                "lung_l1", "ghost_mse", "crossing_bce"}


def test_perceptual_is_an_alias_of_texture(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"loss": {"perceptual": 0.7}}')
    cfg = load_config(p)
    assert cfg.loss.texture == 0.7 and cfg.to_dict()["loss"]["texture"] == 0.7 and "perceptual" not in cfg.to_dict()["loss"]
    assert DetailRefinementLoss({"perceptual": 0.7}).weights["texture"] == 0.7
    p.write_text('{"loss": {"perceptual": 0.7, "texture": 0.1}}')
    with pytest.raises(ConfigError, match="not both"):
        load_config(p)


@pytest.mark.parametrize("raw, needle", [
    ({"training": {"learning_rate": -1e-3}}, "training.learning_rate"),
    ({"model": {"volume_size": 40}}, "model.volume_size"),
    ({"training": {"batch_size": 0}}, "training.batch_size"),
    ({"training": {"num_epochs": True}}, "training.num_epochs"),
    ({"loss": {"l1": -1}}, "loss.l1"),
    ({"loss": {k: 0 for k in DEFAULT_WEIGHTS}}, "nothing to train"),
    ({"model": 3}, "must be an object"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),
])
def test_config_ranges_are_one_line_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle) as exc:
        resolve(raw)
    assert "\n" not in str(exc.value)


def test_presets_ship_as_package_data():
    assert {"cpu-small", "cpu-medium", "full"} <= set(preset_names())
    assert load_config("cpu-small").model.volume_size == 32
    assert ds_config_path() == PKG / "presets" / "ds_config.json" and not ds_config_path().is_symlink()
    with pytest.raises(ConfigError, match="shipped"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not a section"):
        load_config("cpu-small", ["model.volume_size.x=1"])


# -------------------------------------------------------------------------------------- model files
def test_model_file_round_trip_and_safety(tmp_path):
    cfg = load_config("cpu-small")
    base, _ = build_models(cfg)
    path = save_model_file(tmp_path / "b.pt", "base", base.state_dict(), cfg, {"psnr": 20.0}, epoch=3)
    mf = load_model_file(path, stage="base")
    assert mf.epoch == 3 and mf.metrics == {"psnr": 20.0} and mf.config == cfg
    assert state_fingerprint(mf.build().state_dict()) == state_fingerprint(base.state_dict())
    with pytest.raises(DataError, match="expected the refiner"):
        load_model_file(path, stage="refine")
    # a pickle that would run code is refused, not executed (weights_only=True)
    torch.save({"state_dict": {}, "config": {}, "stage": "base", "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="cannot read checkpoint"):
        load_model_file(tmp_path / "evil.pt")
    # weights of another model size: one line naming the file, not 184 lines of size mismatch
    wide = cfg.model_copy(deep=True)
    wide.model.base_width = 4
    blob = torch.load(path, weights_only=True)
    blob["config"] = wide.to_dict()
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(DataError, match="do not fit") as exc:
        load_model_file(tmp_path / "mismatch.pt").build()
    assert "\n" not in str(exc.value)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_resume_with_another_model_config_names_the_keys(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    out = tmp_path / "base"
    out.mkdir()
    cfg = load_config("cpu-small")
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "latest.json").write_text('{"tag": "epoch_0001"}')
    other = load_config("cpu-small", ["model.base_width=16"])
    with pytest.raises(UserError, match=r"model.base_width \(8 -> 16\)"):
        Checkpointer(out, 2, 0, 1).check_compatible(other)
    Checkpointer(out, 2, 0, 1).check_compatible(load_config("cpu-small", ["training.num_epochs=3"]))  # fine


def test_runs_and_model_files_from_before_reprojection_are_read_as_they_were(tmp_path):
    """A stored config without the keys added since (re-projection guidance, DC steps) describes a refiner
    with neither: its run resumes with those settings, refuses today's defaults, and its model file builds."""
    from ctrefine.config import MODEL_KEYS_ADDED
    from ctrefine.training.checkpointing import Checkpointer

    out = tmp_path / "refine"
    out.mkdir()
    old_cfg = load_config("cpu-small", [f"model.{k}={json.dumps(v)}" for k, v in MODEL_KEYS_ADDED.items()])
    raw = old_cfg.to_dict()
    for k in MODEL_KEYS_ADDED:
        del raw["model"][k]
    (out / "config.json").write_text(json.dumps(raw))
    (out / "latest.json").write_text('{"tag": "epoch_0001"}')
    Checkpointer(out, 2, 0, 1).check_compatible(old_cfg)
    with pytest.raises(UserError, match="model.reprojection"):
        Checkpointer(out, 2, 0, 1).check_compatible(load_config("cpu-small"))
    refiner = build_models(old_cfg)[1]
    torch.save({"format": "ctrefine-model", "stage": "refine", "state_dict": refiner.state_dict(), "config": raw},
               tmp_path / "old.pt")
    mf = load_model_file(tmp_path / "old.pt")
    assert mf.config.model.reprojection == "off" and mf.config.model.data_consistency_steps == 0
    mf.build()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from ctrefine import cli

    def user_problem(a):
        raise UserError("the user's mistake")

    def bug(a):
        raise ValueError("a programming error")

    for fn in (user_problem, bug):
        monkeypatch.setattr(cli, "_cmd_info", fn)
        if fn is bug:
            with pytest.raises(ValueError, match="programming error"):
                cli.main(["info"])
        else:
            assert cli.main(["info"]) == 2
            assert capsys.readouterr().err.strip() == "ctrefine: error: the user's mistake"


def test_version_and_underscore_aliases():
    from ctrefine import __version__

    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"ctrefine {__version__}"
    from ctrefine.cli import build_parser

    a = build_parser().parse_args(["infer", "--data_path", "d", "--output-dir", "o", "--num_patients", "2"])
    assert (a.data_path, a.output_dir, a.num_patients) == ("d", "o", 2)


def test_precision_follows_the_hardware(monkeypatch):
    from ctrefine import device as driver

    bf16 = {"bf16": {"enabled": True}}
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(driver, "cpu_has_native_bf16", lambda: False)
    dtype, note = driver.choose_precision(bf16, cpu)
    assert dtype == torch.float32 and "no hardware bf16" in note
    assert driver.choose_precision(bf16, cpu, "bf16") == (torch.bfloat16, "")
    assert driver.choose_precision(bf16, gpu) == (torch.bfloat16, "")
    assert driver.choose_precision({"bf16": {"enabled": False}}, gpu) == (torch.float32, "")
    monkeypatch.setattr(driver, "cpu_has_native_bf16", lambda: True)  # AMX / AVX512-BF16: bf16 as configured
    assert driver.choose_precision(bf16, cpu) == (torch.bfloat16, "")
    assert driver.choose_precision(bf16, cpu, "fp32") == (torch.float32, "")


def test_loading_the_config_schema_imports_no_torch():
    """The config and the loss-term table it is built from are plain Python: `ctrefine --help`, config
    validation and tools that only read a run's settings do not pay for torch."""
    code = "import sys, ctrefine.config; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
