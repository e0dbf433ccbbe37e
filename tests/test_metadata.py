"""The packaging metadata agrees with the code, the README and the checks that use it."""

import ast
import re
import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's setup() call, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # computed (packages, cmdclass): not metadata
            pass
    return out


def requirement(specs: list[str], name: str) -> Requirement:
    (req,) = [r for r in map(Requirement, specs) if r.name == name]
    return req


def test_python_floor_is_the_one_everything_states():
    kw = setup_kwargs()
    (spec,) = SpecifierSet(kw["python_requires"])
    floor = Version(spec.version)
    assert floor >= Version("3.11")  # zppo_fast/config.py imports tomllib, new in 3.11
    assert sys.version_info >= (floor.major, floor.minor)
    assert f"Python {floor.major}.{floor.minor}+" in (ROOT / "README.md").read_text()
    assert f"sys.version_info < ({floor.major}, {floor.minor})" in (ROOT / "bench" / "gpu_check.sh").read_text()


def test_torch_floor_is_met_and_matches_the_tested_pin():
    kw = setup_kwargs()
    torch_req = requirement(kw["install_requires"], "torch")
    installed = Version(torch.__version__.split("+")[0])
    assert installed in torch_req.specifier, (torch.__version__, str(torch_req))
    pinned = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert Version(pinned) in torch_req.specifier
    from torch.distributed.fsdp import FSDPModule  # the newest API the floor is set by (parallelize.py)

    assert hasattr(FSDPModule, "set_reduce_scatter_unused_params")


def test_sglang_extra_is_the_range_the_adapter_was_checked_against():
    from zppo_fast.sglang_engine import INSTALL_HINT, SGLANG_CHECKED

    spec = requirement(setup_kwargs()["extras_require"]["sglang"], "sglang").specifier
    checked = Version(SGLANG_CHECKED.split()[0])
    assert checked in spec and Version(f"{checked.major}.{checked.minor + 1}") not in spec
    assert 'pip install -e ".[sglang]"' in INSTALL_HINT  # works from a checkout; zppo_fast is not on PyPI


def test_license_and_build_requirements():
    assert setup_kwargs()["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text[:200] and "Version 2.0, January 2004" in text[:200]
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = [Requirement(r).name for r in pyproject["build-system"]["requires"]]
    assert "cmake" in build and "pybind11" in build
    test_extra = [Requirement(r).name for r in setup_kwargs()["extras_require"]["test"]]
    assert "pytest-timeout" in test_extra and "cmake" in test_extra


def test_bare_kernels_from_the_checkout_root_is_the_pypi_package(tmp_path):
    """From the checkout's root (python -m, the bench scripts) the folder kernels/ is found first under
    the bare name `kernels`, which is a PyPI package transformers 5.25 imports as its models load: the
    folder hands that import over to the package, and stays zppo_fast.kernels."""
    import os
    import subprocess

    pypi = tmp_path / "site" / "kernels"  # stands for the PyPI package, found after the root
    pypi.mkdir(parents=True)
    (pypi / "__init__.py").write_text("from .layer import CUDAProperties\n")
    (pypi / "layer.py").write_text("class CUDAProperties:\n    pass\n")
    code = ("import kernels, zppo_fast.kernels as ours; "
            "print(kernels.CUDAProperties.__module__, ours.policy_loss.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert run.stdout.split() == ["kernels.layer", "zppo_fast.kernels.policy_loss"], run.stderr[-2000:]
    # With no such package (-S: no site-packages) the folder imports as itself, as transformers' probe of
    # the name expects: it gets as far as its own first import, torch, which -S leaves out.
    code = "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name)"
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.stdout.split() == ["torch"], run.stdout + run.stderr[-2000:]
