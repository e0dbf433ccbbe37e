"""Build and install zppo_fast.

The pure-Python packages are plain setuptools packages; the C++ replay ring
(`csrc/`) is built by CMake (`CMakeLists.txt`) and its pybind11 module is placed
at `zppo_fast/_replay*.so`. Works for `pip install .` and `pip install -e .`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only needs its name."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    """Configure + build one CMake target and drop the module where setuptools expects it.

    setuptools copies the result into the source tree itself for editable installs,
    so writing to `get_ext_fullpath` covers both `pip install .` and `pip install -e .`.
    """

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement, so only importable inside the build

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "building zppo_fast needs CMake >= 3.18 on PATH (apt install cmake, or pip install cmake)"
            )
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DZPPO_BUILD_TESTS=OFF",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():  # a cache fixes its generator
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)
        # CMake names the file with Python's own EXT_SUFFIX, which is what setuptools expects.
        built = build_dir / out.name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        shutil.copyfile(built, out)


# `kernels/` lives at the top level (so other trainers can vendor it) but is imported as
# `zppo_fast.kernels`; never as bare `kernels`, a PyPI name transformers uses.
PACKAGES = (
    find_packages(include=["zppo_fast", "zppo_fast.*"])
    + ["zppo_fast.kernels"]
    + [f"zppo_fast.kernels.{p}" for p in find_packages("kernels")]
)
PACKAGE_DIR = {"zppo_fast": "zppo_fast", "zppo_fast.kernels": "kernels"}

setup(
    name="zppo_fast",
    version="0.1.0",
    description="A lean RL post-training trainer for ZPPO (Zone of Proximal Policy Optimization).",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=[CMakeExtension("zppo_fast._replay", target="_replay")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.6",
        "triton; sys_platform == 'linux'",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # zppo_fast/sglang_engine.py was checked against SGLang's source of the 0.5.19 line
        # (commit 001067ff): flattened-bucket weight pushes, memory-saver tags, sampling_seed.
        "sglang": ["sglang>=0.5.19"],
        "liger": ["liger-kernel"],
        # liger-kernel and trl: tests/test_kernels_policy_module.py and tests/test_examples.py compare
        # FusedLinearPolicyLoss with LigerFusedLinearGRPOLoss and GRPOTrainer's own loss (CPU).
        # wandb: tests/test_metrics.py's offline W&B run; datasets: the Hugging Face folder in
        # tests/test_columns.py.
        "test": ["pytest", "hypothesis", "liger-kernel", "trl", "wandb", "datasets"],
        # bench/bench_vs_trl.py: TRL's GRPOTrainer (and its datasets) beside zppo_fast; not needed by `make test`.
        "bench": ["trl", "datasets"],
        "tensorboard": ["tensorboard"],
        # run.wandb = true (zppo_fast/metrics.py): offline unless WANDB_MODE=online.
        "wandb": ["wandb"],
        # parallel.attention = auto picks flash_attention_2 on CUDA when this is installed (varlen
        # attention over packed rows). It compiles against the installed torch: install torch first,
        # then `pip install --no-build-isolation "zppo_fast[flash-attn]"`.
        "flash-attn": ["flash-attn"],
        # zppo_fast/datasets.py: Parquet files and `datasets.save_to_disk` folders.
        "data": ["pyarrow", "datasets"],
        # zppo_fast/graders.py: the optional math_verify grader.
        "mathverify": ["math-verify"],
    },
    zip_safe=False,
)
