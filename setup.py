"""ctrefine: dual-view X-ray -> CT reconstruction with a detail-refinement stage.

Packaging notes
---------------
* ``torch`` is pinned exactly (``==2.13.0``): on the project's machines that version resolves to a
  local CPU wheel, while any range admitting a newer release pulls several GB of CUDA packages.
* The source tree is the package: ``ctrefine/kernels/`` (Triton kernels) and ``ctrefine/presets/``
  (training presets and ``ds_config.json``, as package data) import the same from a checkout and from
  an installed ``ctrefine``; nothing is mapped in at install time.
* ``ctrefine/pretrained/`` ships trained model files (each <= 10 MB, with a model card) as package
  data, named ``pretrained:NAME`` wherever a checkpoint path is taken.
"""
from setuptools import setup

VERSION = "0.1.0"

setup(
    name="ctrefine",
    version=VERSION,
    description="Two-stage CT reconstruction from dual-view radiographs with a detail refinement network",
    python_requires=">=3.10",
    packages=[
        "ctrefine",
        "ctrefine.data",
        "ctrefine.models",
        "ctrefine.losses",
        "ctrefine.training",
        "ctrefine.kernels",
        "ctrefine.presets",
        "ctrefine.pretrained",
    ],
    package_data={"ctrefine": ["viewer_template.html"], "ctrefine.presets": ["*.json"],
                  "ctrefine.pretrained": ["*.pt", "*.md"]},
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "nibabel>=5.0",
        "triton>=3.0,<4",
        "deepspeed>=0.19,<0.20",  # 0.19.8 measured here: CPU accelerator + gloo, bf16 ZeRO-2
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript>=0.1",
        "openvino>=2025.0,<2027",  # the faster CPU engine for the exported graph (2026.4.1 measured here)
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=9.0",
        "scikit-image>=0.21",
        "pydantic>=2.5,<3",  # the typed config (deepspeed needs pydantic 2 as well)
        "pydicom>=2.4",  # DICOM CT series and DICOM radiographs (scanner/PACS exports)
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3"],
    },
    entry_points={"console_scripts": ["ctrefine=ctrefine.cli:main"]},
)
