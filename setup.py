"""Build and install zppo_fast.

The pure-Python packages are plain setuptools packages; the C++ replay ring
(`csrc/`) is built by CMake (`CMakeLists.txt`) and its pybind11 module is placed
at `zppo_fast/_replay*.so`. Works for `pip install .` and `pip install -e .`.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only needs its name."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


def _cmake() -> str:
    """CMake from PyPI (pyproject.toml's build requirements, so a machine without one builds), or, in a
    build without isolation (`--no-build-isolation`) that lacks the package, the one on PATH."""
    try:
        import cmake  # the PyPI package: its binary lives in the package

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            raise RuntimeError("building zppo_fast needs CMake >= 3.18: pip install cmake (or apt install cmake), "
                               "or build with pip's default build isolation, which installs it") from None
        return found


class CMakeBuild(build_ext):
    """Configure + build one CMake target and drop the module where setuptools expects it.

    setuptools copies the result into the source tree itself for editable installs,
    so writing to `get_ext_fullpath` covers both `pip install .` and `pip install -e .`.
    """

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement, so only importable inside the build

        headers = Path(sysconfig.get_paths()["include"])
        if not (headers / "Python.h").is_file():
            raise RuntimeError(
                f"building zppo_fast's C++ module needs the headers of this Python ({sys.executable}, "
                f"{sysconfig.get_python_version()}), and {headers / 'Python.h'} does not exist: install them "
                f"(Debian/Ubuntu: apt install python{sysconfig.get_python_version()}-dev; Fedora/RHEL: "
                "dnf install python3-devel; conda and pyenv Pythons ship them)"
            )
        cmake = _cmake()
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
    license="Apache-2.0",
    python_requires=">=3.11",  # tomllib (zppo_fast/config.py)
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=[CMakeExtension("zppo_fast._replay", target="_replay")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # The newest torch API the code calls is FSDPModule.set_reduce_scatter_unused_params (2026;
        # zppo_fast/parallelize.py, vision-language students); FSDP2's set_gradient_divide_factor and
        # set_force_sum_reduction_for_comms, torch.library.custom_op and torch.OutOfMemoryError are
        # older. 2.13 is the release the suite runs on (Makefile) and the one sglang 0.5.19 pins.
        "torch>=2.13",
        "triton; sys_platform == 'linux'",
        # Below 5.26, the newest release the suite has passed on: zppo_fast/shared_prefix.py's state
        # handover and zppo_fast/qwen35_decode.py read transformers' Gated-DeltaNet cache, whose
        # calls 5.25 changed (get_recurrent_states_to_keep, ...). (5.25 also depends on the PyPI
        # package `kernels`: kernels/__init__.py hands that name over when the checkout's root is on
        # sys.path.)
        "transformers>=5.0,<5.26",
        "tokenizers",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
        # zppo_fast/reward.py: the paper's rule grader (mathruler.grader, PRM800K's) and what it imports
        "mathruler",
        "pylatexenc",
        "sympy",
    ],
    extras_require={
        # zppo_fast/sglang_engine.py was checked against SGLang's source of the 0.5.19 line
        # (commit 001067ff): flattened-bucket weight pushes, memory-saver tags, sampling_seed; a
        # 0.6 may change those internals, so the range stops before it.
        "sglang": ["sglang>=0.5.19,<0.6"],
        "liger": ["liger-kernel"],
        # liger-kernel and trl: tests/test_kernels_policy_module.py and tests/test_examples.py compare
        # FusedLinearPolicyLoss with LigerFusedLinearGRPOLoss and GRPOTrainer's own loss (CPU).
        # wandb: tests/test_metrics.py's offline W&B run; datasets: the Hugging Face folder in
        # tests/test_columns.py; mathruler, pylatexenc: tests/test_reward_agreement.py's reference.
        # pytest-timeout: the per-test limit of pyproject.toml (a hang fails). cmake: `make test`'s
        # C++ tests run the venv's cmake / ctest (no system CMake needed). packaging:
        # tests/test_metadata.py reads the requirement specifiers. scipy: bench/effect.py's t-intervals,
        # run by tests/test_bench_smoke.py and checked against scipy's own in tests/test_bench_effect.py.
        "test": ["pytest", "pytest-timeout", "hypothesis", "liger-kernel", "trl", "wandb", "datasets", "mathruler",
                 "pylatexenc", "sympy", "cmake>=3.18", "packaging", "scipy"],
        # bench/bench_vs_trl.py: TRL's GRPOTrainer (and its datasets) beside zppo_fast; bench/effect.py: scipy
        # (t quantiles); not needed by `make test`.
        "bench": ["trl", "datasets", "scipy"],
        "tensorboard": ["tensorboard"],
        # run.wandb = true (zppo_fast/metrics.py): offline unless WANDB_MODE=online.
        "wandb": ["wandb"],
        # parallel.attention = auto picks flash_attention_2 on CUDA when this is installed (varlen
        # attention over packed rows). It compiles against the installed torch: install torch first,
        # then `pip install --no-build-isolation -e ".[flash-attn]"`.
        "flash-attn": ["flash-attn"],
        # zppo_fast/datasets.py: Parquet files and `datasets.save_to_disk` folders.
        "data": ["pyarrow", "datasets"],
        # zppo_fast/graders.py: the optional math_verify grader.
        "mathverify": ["math-verify"],
    },
    zip_safe=False,
)
