"""The one place that decides how ctrefine runs on a device: precision, memory layout, compilation,
data placement and the metrics' arithmetic.

Training (:mod:`ctrefine.training`), validation, inference and the metrics read these decisions
from here, so a GPU fast path is a change in this module, not in four. The *mechanisms* live where
they act (channels-last hooks in :mod:`ctrefine.models.layout`, device-resident splits in
:mod:`ctrefine.data.dataset`); the *choices* are made below, each with the measurement behind it.

Only torch and :mod:`ctrefine.errors` are imported: every floor of the package may ask.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

# At or below this finest width channels-last-3d pays on CPU (bench/train_speed.py, 64^3, bf16, 2 threads:
# base width 8 1.39x, refiner hidden 16 1.48x; base width 32 0.76x, refiner hidden 64 0.94x).
NARROW = 16
# A split is kept on the device when it takes at most this share of the device's free memory (800 phantoms
# at 64^3 with 128^2 radiographs are ~0.9 GB: a few percent of a data-centre GPU).
RESIDENT_SHARE = 0.25


@functools.lru_cache(maxsize=1)
def kernels_import_error() -> str | None:
    """Why Triton or ``ctrefine.kernels`` cannot be imported (``"ModuleNotFoundError: ..."``), or None."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
        from .kernels import groupnorm_silu, laplacian_l1, spectral_l1  # noqa: F401
    except Exception as exc:  # a broken kernel module is reported, whatever it raises
        return f"{type(exc).__name__}: {exc}"
    return None


# What ``auto`` picks for CUDA tensors, per kernel family, as measured on one H200 (bench/RESULTS-history.md,
# section 12): the loss kernels, yes; the fused GroupNorm + SiLU, no -- at the mission's shapes its
# host-side cost (Python + Triton launch, ~0.6 ms a call forward) outweighs the device time it saves
# (isolated `full` base step 92.8 ms with it, 76.4 ms without; the refiner's 80.6 vs 81.1 ms).
AUTO_ON_CUDA = {"loss": True, "groupnorm": False}


@dataclass(frozen=True)
class Kernels:
    """Which families run as Triton kernels (``ctrefine.kernels``) instead of their pure-torch references.
    Decided once per run by :func:`kernel_choice` and given to the models and the loss at construction."""

    loss: bool = False  # laplacian_l1 and spectral_l1 (ctrefine.losses.functional)
    groupnorm: bool = False  # the fused GroupNorm + SiLU (ctrefine.models.norm)


def kernel_choice(device: torch.device) -> Kernels:
    """The one dispatch between the Triton kernels and their references, for a run on ``device``:

    * ``CTREFINE_KERNELS=0`` -> the references (for comparisons and debugging);
    * ``CTREFINE_KERNELS=1`` -> the kernels (errors if Triton cannot run them; on CPU this works only under
      ``TRITON_INTERPRET=1``, which is how the tests exercise this path);
    * unset / ``auto`` -> on CUDA the families that measured faster there (:data:`AUTO_ON_CUDA`); a kernel
      module that does not import is then a one-line :class:`ConfigError`, never a silent fallback; on a
      CPU the references.
    """
    mode = kernel_mode(device)
    if mode != "auto":
        return Kernels(**{f: mode == "on" for f in AUTO_ON_CUDA})
    if device.type != "cuda":
        return Kernels()
    if err := kernels_import_error():
        raise ConfigError(f"the Triton kernels do not import on this CUDA machine ({err}); "
                          "set CTREFINE_KERNELS=0 to run the pure-torch references")
    return Kernels(**AUTO_ON_CUDA)


def kernel_mode(device: torch.device | None = None) -> str:
    """``CTREFINE_KERNELS`` read and checked: ``off``, ``on`` or ``auto`` (a one-line :class:`ConfigError`
    for anything else, and for ``on`` where the kernels cannot run: no Triton, or a CPU without
    ``TRITON_INTERPRET=1``). Commands call it before any work, so a bad setting writes nothing."""
    raw = os.environ.get("CTREFINE_KERNELS", "auto")
    mode = raw.strip().lower()
    if mode in ("0", "off", "false", "ref", "reference"):
        return "off"
    if mode in ("auto", ""):
        return "auto"
    if mode not in ("1", "on", "true", "force"):
        raise ConfigError(f"CTREFINE_KERNELS must be 0, 1 or auto, got {raw!r}")
    on_cpu = (device or torch.device("cuda" if has_cuda() else "cpu")).type == "cpu"
    if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ConfigError("CTREFINE_KERNELS=1 needs a CUDA GPU (on a CPU the kernels run only under "
                          "TRITON_INTERPRET=1, thousands of times slower); unset it or set CTREFINE_KERNELS=0")
    if err := kernels_import_error():
        raise ConfigError(f"CTREFINE_KERNELS=1 but the Triton kernels do not import ({err})")
    return "on"


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU: the one place ctrefine asks."""
    return torch.cuda.is_available()


def gpu_count() -> int:
    return torch.cuda.device_count() if has_cuda() else 0


def env_int(name: str, default: int) -> int:
    """An integer environment variable a launcher sets (``LOCAL_RANK``, ...); a one-line error if it is not one."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def free_port() -> int:
    """A free TCP port on this machine, for a distributed run's rendezvous (``MASTER_PORT``)."""
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a `taskset` or a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def rank_device(local_rank: int, world: int) -> torch.device:
    """This rank's device under DeepSpeed's accelerator: its own GPU, or the CPU with the cores shared
    between the ranks on this machine (one thread per rank when there are as many ranks as cores)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(max(1, usable_cores() // max(1, env_int("LOCAL_WORLD_SIZE", world))))
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), read from /proc/cpuinfo (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(ds_cfg: dict, device: torch.device, precision: str = "auto") -> tuple[torch.dtype, str]:
    """(compute dtype, a note for the user or "").

    ``auto`` takes ds_config's bf16 setting, except on a CPU without hardware bf16: there bf16 3D
    convolutions are emulated and slow (measured on an AVX2-only AMD EPYC, cpu-small base step,
    2 threads: fp32 468 ms, bf16 14.9 s), so auto trains in fp32 and says so. ``bf16`` / ``fp32`` force.
    """
    want_bf16 = bool(ds_cfg.get("bf16", {}).get("enabled", False))
    if precision == "fp32" or (precision == "auto" and not want_bf16):
        return torch.float32, ""
    if precision == "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return torch.bfloat16, ""
    return torch.float32, ("this CPU has no hardware bf16 (no AVX512-BF16 / AMX): training in fp32, ~30x faster "
                           "here than emulated bf16 (--precision bf16 forces it)")


def channels_last(conv_widths: list[int], device: torch.device, setting: str = "auto") -> bool:
    """Whether a model whose 3D convolutions have ``conv_widths`` output channels (heads with one output
    aside) should run them in channels-last-3d on ``device``.

    ``auto``: on a CPU, when at least a fifth of those convolutions have at most :data:`NARROW` channels
    -- one narrow layer (the refiner's guidance fusion) does not make a wide model narrow. Wide layers
    are already compute-bound there (42-45 % of the bf16 matmul rate) and only pay for the copies. On
    CUDA cuDNN transposes NCDHW to NDHWC around its bf16 kernels (11.5 % of the `full` refiner's step on
    an H200), which channels-last removes, but that is not yet measured end to end: off until it is
    (``training.channels_last=on`` forces it; ``bench/gpu_check.sh`` measures both).
    """
    if setting != "auto":
        return setting == "on"
    widths = sorted(w for w in conv_widths if w > 1)
    return device.type == "cpu" and bool(widths) and widths[len(widths) // 5] <= NARROW


def inference_device(setting: str = "auto") -> torch.device:
    """Where torch inference runs: ``auto`` -- the GPU when there is one, else the CPU; ``cpu``; ``cuda``
    (a one-line :class:`ConfigError` on a machine without one)."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not has_cuda():
        raise ConfigError("device cuda asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    return torch.device("cuda" if setting == "cuda" or (setting == "auto" and has_cuda()) else "cpu")


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The arithmetic of torch inference: ``auto`` -- bf16 autocast on CUDA (tensor cores; a 64^3 volume's PSNR
    moves by hundredths of a dB), fp32 on a CPU, where the exported graph in OpenVINO is the fast path and
    torch stays the exact reference; ``bf16`` / ``fp32`` force one."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def onnx_precision(setting: str = "auto") -> str:
    """The precision an exported graph is tagged with: ``auto`` -- ``bf16`` on a CPU that computes bf16 in
    hardware (AVX512-BF16 / AMX: OpenVINO then runs the graph in bf16, 1.32x torch bf16 there, where the fp32
    file ran at 0.82x; bench/RESULTS-history.md sections 4 and 17), else ``fp32``; anything else as given."""
    if setting != "auto":
        return setting
    return "bf16" if not has_cuda() and cpu_has_native_bf16() else "fp32"


def metrics_dtype(device: torch.device) -> torch.dtype:
    """The arithmetic of the image metrics on ``device``.

    float64 on the CPU (where it costs little and the reported figures have always been computed so);
    float32 on accelerators, where float64 is slow. The difference is far below what a report prints:
    PSNR within 1e-4 dB and SSIM within 1e-5 of float64 (tests/test_metrics.py holds both).
    """
    return torch.float64 if device.type == "cpu" else torch.float32


def resident_bytes_ok(nbytes: int, device: torch.device) -> bool:
    """Whether a split of ``nbytes`` may live on ``device`` for a whole run (always on the CPU: it
    already does; on CUDA up to :data:`RESIDENT_SHARE` of the free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


@dataclass(frozen=True)
class DevicePolicy:
    """Every per-device decision of one training run, made once (:meth:`for_run`)."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype of the trainable model (autocast / DeepSpeed bf16)
    note: str = ""  # why precision differs from what was asked, for the user
    compile: bool = False  # torch.compile the trainable module (training.compile)
    kernels: Kernels = Kernels()  # which Triton kernels the models and the loss run

    @classmethod
    def for_run(cls, device: torch.device, ds_cfg: dict, precision: str = "auto", compile: str = "off"):
        dtype, note = choose_precision(ds_cfg, device, precision)
        return cls(device, dtype, note, compile == "on", kernel_choice(device))

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype radiographs are kept in on the device: the model's compute dtype, so no step casts."""
        return self.dtype

    @property
    def metrics_dtype(self) -> torch.dtype:
        return metrics_dtype(self.device)

    def use_channels_last(self, conv_widths: list[int], setting: str) -> bool:
        return channels_last(conv_widths, self.device, setting)

    def keep_resident(self, nbytes: int) -> bool:
        return resident_bytes_ok(nbytes, self.device)

    def synchronize(self) -> None:
        """Wait for the device's queued work (once an epoch, for honest timings; never per step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        """Autocast to the compute dtype (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
