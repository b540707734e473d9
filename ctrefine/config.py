"""The one config path: a typed schema (pydantic), JSON presets that override it, ``--set`` on top.

Schema: ``model / training / loss / data / checkpoint / logging``. A preset only lists
what it changes. Validation is strict: an unknown key, a value of the wrong type or out of range is a
one-line :class:`~ctrefine.errors.ConfigError` naming the key -- a typo must never silently fall back
to a default. Each field's ``description`` says why its default is what it is.

Presets ship inside the package (``ctrefine/presets/``), together
with ``ds_config.json``, so an installed ``ctrefine`` works outside a source checkout::

    load_config("cpu-small")                 # a shipped preset, by name
    load_config("my-run.json")               # any JSON file
    load_config("full", ["training.num_epochs=2", "loss.texture=0"])
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from .errors import ConfigError
from .losses.registry import ALIASES, TERMS

__all__ = ["Config", "ConfigError", "load_config", "resolve", "apply_overrides", "read_json_object", "preset_path",
           "preset_names", "ds_config_path"]


class _Section(BaseModel):
    # allow_inf_nan=False: "--set training.learning_rate=Infinity" is refused by name, like any other bad value
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False, allow_inf_nan=False)


class ModelConfig(_Section):
    volume_size: int = Field(64, ge=16, multiple_of=16,
                             description="target grid side (voxels); 64^3 at 5 mm covers the 320 mm FOV; the base's "
                                         "five scales need a multiple of 16")
    xray_size: int = Field(128, ge=16, le=2048, description="radiograph side (pixels); 2x the volume so DRRs carry "
                                                            "sub-voxel detail")
    base_width: int = Field(32, ge=1, description="base channel width -> 15.2M parameters at 64^3 (the design's ~16M)")
    hidden_channels: int = Field(64, ge=2, description="refiner width -> 5.0M parameters (the design's ~5M)")
    guidance_channels: int = Field(16, ge=1, description="X-ray detail guidance features per view")
    freq_bins: int = Field(16, ge=1, description="radial frequency bands of each FrequencyAttention gain")
    mid_blocks: int = Field(4, ge=0, description="residual blocks at the refiner's quarter resolution")
    reprojection: Literal["cone", "parallel", "off"] = Field(
        "cone", description="refiner: re-project the coarse volume in this geometry and feed the residual (the "
                            "dataset's geometry; 'off' = no re-projection guidance, as in models before it existed)")
    xray_guidance: Literal["image+laplacian", "image", "off"] = Field(
        "image+laplacian", description="refiner: what each radiograph contributes as lifted 2D detail cues -- the image "
                                       "and its 2D Laplacian, the image alone, or nothing (the ablations of the "
                                       "streak measure, bench/RESULTS-history.md section 17)")
    data_consistency_steps: int = Field(
        2, ge=0, description="refiner: learned SIRT steps towards the radiographs before the U-Net (2: parameter-free, "
                             "they lift the shipped base by 0.3 dB, a third adds 0.01; 0 = none, as in older models)")
    dc_weighting: Literal["uniform", "density"] = Field(
        "density", description="refiner: how each SIRT step spreads a ray's deficit along the ray -- evenly, or in "
                               "proportion to the volume's own attenuation (less into lung and air; the 64^3 "
                               "ablation in bench/RESULTS.md: lower streak index and lung error)")
    residual_fusion: Literal["views", "views+product"] = Field(
        "views+product", description="refiner: the back-projected re-projection residuals of both views, alone or "
                                     "with their product (large only where both views' rays miss attenuation: "
                                     "where along the rays the deficit lies; +0.12 dB in the 64^3 ablation)")
    wall_cue: Literal["off", "depth+detail"] = Field(
        "off", description="refiner: four parameter-free channels that say where the chest wall is and put each "
                           "radiograph's rib edges there only (ctrefine.models.chest_wall; the ablation in "
                           "bench/RESULTS.md)")
    guidance_depth: Literal["along-rays", "cross-view"] = Field(
        "along-rays", description="refiner: each radiograph's lifted detail features spread evenly along their rays, "
                                  "or placed in depth by weights read from both views and the coarse volume "
                                  "(ctrefine.models.ray_placement)")
    residual_weighting: Literal["uniform", "density", "learned"] = Field(
        "uniform", description="refiner: the re-projection residual spread back along each ray evenly, in "
                               "proportion to the coarse volume's attenuation (as dc_weighting's density), or "
                               "placed along it by learned weights (ctrefine.models.ray_placement)")
    guidance_crossing: Literal["off", "mlp"] = Field(
        "off", description="refiner: also read both radiographs' neighbourhoods together at every voxel (a small "
                           "per-voxel MLP: a vessel, or two shadows crossing; ctrefine.models.crossing_reader)")
    base_model_checkpoint: str | None = Field(None, description="refine stage: the trained base's best_model.pt; "
                                                                "null = <checkpoint.dir>/base/best_model.pt")


# model-section keys added after model files and runs existed, and the value that describes those older ones
# (today's defaults differ): read wherever a stored config is (model files, resumed runs)
MODEL_KEYS_ADDED = {"reprojection": "off", "data_consistency_steps": 0, "xray_guidance": "image+laplacian",
                    "dc_weighting": "uniform", "residual_fusion": "views", "wall_cue": "off",
                    "guidance_depth": "along-rays", "residual_weighting": "uniform", "guidance_crossing": "off"}


def upgrade_stored(raw: dict) -> dict:
    """A stored config (model file, run folder) with the model keys it predates filled in as they were."""
    if not isinstance(raw.get("model"), dict):
        return raw
    return {**raw, "model": {**MODEL_KEYS_ADDED, **raw["model"]}}


class TrainingConfig(_Section):
    batch_size: int = Field(4, ge=1, description="per rank (DeepSpeed's train_micro_batch_size_per_gpu)")
    num_epochs: int = Field(40, ge=1, description="epochs of the cosine schedule (the refine stage's budget)")
    base_num_epochs: int | None = Field(None, ge=1, description="epochs of the base stage if it needs a different "
                                                                "budget; null = num_epochs")
    learning_rate: float = Field(2e-4, gt=0, description="AdamW; peak of the cosine schedule")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up before the cosine decay")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine floor as a fraction of the peak LR")
    seed: int = Field(0, ge=0, description="model init, data order and RNG streams")
    early_stopping_patience: int = Field(0, ge=0, description="epochs without val improvement before stopping; "
                                                              "0 = never")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="3D convolutions and up-sampling in channels-last-3d on CPU (ctrefine.models.layout); "
                            "auto = on for narrow models (1.4-1.5x at 64^3), off for wide ones (0.8-0.9x)")
    time_budget_s: float | None = Field(
        None, gt=0, description="wall seconds for one invocation of a stage, set-up included: after every epoch the "
                                "cosine schedule is refitted to the epochs that fit (at most the stage's epochs), so a "
                                "run in a fixed window still ends annealed; null = no budget")
    init_checkpoint: str | None = Field(
        None, description="start the stage's model from this model file (same stage and architecture; "
                          "pretrained:NAME allowed) instead of a random init: fine-tuning, e.g. a shipped model on "
                          "recalibrated phantoms; a resumed run continues from its own checkpoint; null = random")
    compile: Literal["off", "on"] = Field(
        "off", description="torch.compile the trainable model (ctrefine.device): off until measured faster on the "
                           "device (bench/gpu_check.sh measures both); the first steps then include the compilation")
    engine: Literal["auto", "plain", "deepspeed"] = Field(
        "auto", description="auto: a plain single-device loop (bf16 autocast, fused AdamW) on one rank, DeepSpeed ZeRO "
                            "on several (ctrefine.training.engine: on one device ZeRO partitions nothing and costs "
                            "host time every step); deepspeed: ZeRO even on one rank")


def _loss_field(name: str):
    term = TERMS[name]
    alias = AliasChoices(name, *term.aliases) if term.aliases else None
    return (float, Field(term.default_weight, ge=0, validation_alias=alias, description=term.doc))


class _LossBase(_Section):
    @model_validator(mode="before")
    @classmethod
    def _one_name_per_term(cls, raw):
        if isinstance(raw, dict):
            for alias, name in ALIASES.items():
                if alias in raw and name in raw:
                    raise ValueError(f"give {name!r} or its old name {alias!r}, not both")
        return raw

    @model_validator(mode="after")
    def _something_to_learn(self):
        if not any(w > 0 for w in self.model_dump().values()):
            raise ValueError("every loss weight is 0: nothing to train")
        return self


# One field per registered loss term (weight >= 0; "perceptual" accepted as another name of "texture").
LossConfig = create_model("LossConfig", __base__=_LossBase, **{name: _loss_field(name) for name in TERMS})


class DataConfig(_Section):
    data_path: str = Field("runs/demo/data", description="a dataset made by `ctrefine make-data` or `ctrefine prepare`")
    train_split: str = Field("train", description="split trained on")
    val_split: str = Field("val", description="split for per-epoch validation, best-model choice, early stopping")


class AugmentConfig(_Section):
    """Ranges of the training-time imaging chain (:mod:`ctrefine.data.augment`); each draw is per image."""

    enabled: bool = Field(False, description="re-render every training radiograph through a random imaging chain "
                                             "(validation and inference inputs never are)")
    beam_hardening: float = Field(0.15, ge=0, lt=1, description="largest fraction of the densest ray's "
                                                                "log-attenuation lost to beam hardening")
    scatter_fraction: float = Field(0.3, ge=0, lt=1, description="largest share of detected signal that is scatter "
                                                                 "(chest, anti-scatter grid: about 0.2-0.35)")
    blur_px: float = Field(1.0, ge=0, description="largest detector blur sigma, in radiograph pixels")
    photons_min: float = Field(1e4, gt=0, description="fewest photons in an unattenuated pixel (noisiest image)")
    photons_max: float = Field(1e6, gt=0, description="most photons in an unattenuated pixel")
    gamma_jitter: float = Field(0.2, ge=0, description="display gamma drawn in [1/(1+j), 1+j] (log-uniform)")

    @model_validator(mode="after")
    def _photon_range(self):
        if self.photons_min > self.photons_max:
            raise ValueError(f"augment.photons_min ({self.photons_min}) exceeds augment.photons_max ({self.photons_max})")
        return self


class CheckpointConfig(_Section):
    dir: str = Field("runs/default", description="checkpoints, CSV logs and best-model exports go to <dir>/<stage>/")
    save_every: int = Field(1, ge=1, description="epochs between periodic checkpoints")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept on disk (the best model file is separate)")


class LoggingConfig(_Section):
    log_every: int = Field(10, ge=1, description="steps between train_log.csv rows (each costs a host sync)")
    tensorboard: bool = Field(True, description="also write TensorBoard events when tensorboard is installed")


class Config(_Section):
    """The resolved configuration of a run: saved in ``config.json`` and inside every model file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what config.json and model files store)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> "Config":
        """Validate a raw dict (a preset, or the config stored in a model file)."""
        raw = {k: v for k, v in raw.items() if k != "_comment"}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            msg = _one_line(exc)
            raise ConfigError(f"{source}: {msg}" if source else msg) from None

    def loss_weights(self) -> dict[str, float]:
        return self.loss.model_dump()


def _one_line(exc: ValidationError) -> str:
    """The first validation problem as one line naming the dotted key."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if not key:
        return msg
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"config key {key!r} must be an object"
    return f"config key {key!r}: {msg.lower() if msg[:1].isupper() else msg}, got {err.get('input')!r}"


def resolve(overrides: dict | None = None) -> Config:
    """Defaults with ``overrides`` (a raw nested dict) merged in, validated."""
    return Config.from_dict(overrides or {})


def read_json_object(path, error=ConfigError) -> dict:
    """Read a JSON file that must hold an object; problems become one-line ``error``."""
    from .jsonio import read_json  # the one JSON reader

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    return read_json(path, error)


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply ``KEY=VALUE`` strings (dotted keys, JSON values; bare strings allowed) to a raw preset."""
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass  # a bare string such as a path
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = val
    return raw


# ------------------------------------------------------------------------------------- presets
def _presets_dir():
    return resources.files("ctrefine.presets")


def preset_names() -> list[str]:
    """Names of the shipped training presets (``cpu-small``, ``cpu-medium``, ``full``)."""
    return sorted(p.name[:-5] for p in _presets_dir().iterdir()
                  if p.name.endswith(".json") and p.name != "ds_config.json")


def preset_path(name: str) -> Path:
    """Path of a shipped preset by name."""
    if name not in preset_names():
        raise ConfigError(f"no preset named {name!r} (shipped: {', '.join(preset_names())})")
    return Path(str(_presets_dir() / f"{name}.json"))


def ds_config_path() -> Path:
    """The shipped DeepSpeed config (ZeRO-2, bf16): the default of every launch."""
    return Path(str(_presets_dir() / "ds_config.json"))


def _locate(spec) -> Path:
    """A config argument is a JSON file path, or the bare name of a shipped preset."""
    path = Path(spec)
    if path.is_file() or path.suffix == ".json" or len(path.parts) > 1:
        return path
    return preset_path(str(spec))


def load_config(spec, overrides: list[str] | None = None) -> Config:
    """Read a JSON preset (path or shipped name), apply ``KEY=VALUE`` overrides, validate."""
    path = _locate(spec)
    raw = read_json_object(path)
    try:
        raw = apply_overrides(raw, overrides or [])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return Config.from_dict(raw, source=str(path))
