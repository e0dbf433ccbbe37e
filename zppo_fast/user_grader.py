"""The user's own reward function as a grader: `data.grader = "my_module:my_fn"` (eval: `--grader`).

`my_module` is imported from Python's path (the working directory, an installed package), or the
spec names a file: `"rewards/math.py:my_fn"` (relative to the working directory). Two protocols,
chosen by the function's `batched` attribute:

    def my_fn(response: str, gold: str) -> float:            # per item (the default)
        return float(response.strip().endswith(gold))

    def my_batch_fn(responses: list[str], golds: list[str]) -> list[float]:
        return remote_verifier(responses, golds)             # one call per graded batch
    my_batch_fn.batched = True

`response` is the model's decoded completion (the text after its chat prompt); `gold` is the row's
answer column as text (an integer answer as its digits, a multiple-choice answer as the data
writes it). The score is a real number in [0, 1] (bool, int, float, a numpy or torch scalar; a batched
function may return a list, tuple, numpy array or tensor of them, one per item). Fractions are
partial rewards: advantages and accuracies use them as they are; where the trainer needs a yes/no
(a teacher rollout counts as a correct candidate, eval's verdict) only 1.0 is correct.

Every rank of a torchrun world grades the whole batch, as with the built-in graders, and computes
advantages and replay decisions from its own scores: the function must give the same score for the
same (response, gold) on every rank (no sampling; a remote verifier at temperature 0).

Errors name the function: a spec that cannot be imported, or names no callable, is a ConfigError
when the grader is built (the trainer builds it before loading any model); a score that is not a
number in [0, 1] (a str, None, NaN, 2.0, a list of the wrong length), or an exception raised by a
batched function, is a `GraderFunctionError` naming the function, the item and the value. A
per-item function that raises on one response scores it 0.0 with the verdict "error": the trainer
counts those (reward/grader_errors) and shows the first with its input.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from zppo_fast.config import ConfigError
from zppo_fast.graders import GradeItem, Verdict, error_verdict

__all__ = ["FunctionGrader", "GraderFunctionError", "load_function"]


class GraderFunctionError(RuntimeError):
    """The user's reward function raised, or returned something that is not a score in [0, 1]."""


def load_function(spec: str) -> Callable:
    """The callable `spec` ("module.path:name" or "path/to/file.py:name") names; ConfigError otherwise."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"grader {spec!r}: a reward function is named MODULE:FUNCTION, e.g. my_rewards:exact_match")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # ModuleNotFoundError, or anything the module's own import code raises
        raise ConfigError(f"grader {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e} (a module is "
                          "imported from the working directory or an installed package; or name a file, "
                          "path/to/file.py:FUNCTION)") from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"grader {spec!r}: {module_name!r} has no {attr!r}; its functions: "
                          f"{', '.join(public) or 'none'}")
    if not callable(fn):
        raise ConfigError(f"grader {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_file(path: Path):
    """The module of a Python file, executed once per process (as an import would be): the trainer and
    every evaluation build their graders from the same spec, and the file may load something costly."""
    if not path.is_file():
        raise ConfigError(f"grader file {path} does not exist (relative paths are from {Path.cwd()})")
    path = path.resolve()
    name = f"zppo_user_grader_{path.stem}"
    if getattr(sys.modules.get(name), "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so the module's own dataclasses and pickling find it
    spec.loader.exec_module(module)
    return module


class FunctionGrader:
    """A `zppo_fast.graders.Grader` calling the user's function (the module docstring's protocol)."""

    def __init__(self, spec: str):
        self.name = spec
        self.fn = load_function(spec)
        self.batched = bool(getattr(self.fn, "batched", False))

    def grade_batch(self, items: Sequence[GradeItem]) -> list[Verdict]:
        if not items:
            return []
        if self.batched:
            scores = self._call([it.response for it in items], [it.gold for it in items], "the batch")
            if hasattr(scores, "tolist"):  # a numpy array or a tensor
                scores = scores.tolist()
            if not isinstance(scores, (list, tuple)) or len(scores) != len(items):
                got = f"{len(scores)} scores" if isinstance(scores, (list, tuple)) else repr(scores)[:80]
                raise GraderFunctionError(f"grader {self.name} (batched) returned {got} for {len(items)} items; "
                                          f"expected a list of {len(items)} numbers in [0, 1]")
            return [self._verdict(s, i, it) for i, (s, it) in enumerate(zip(scores, items))]
        verdicts = []
        for i, it in enumerate(items):
            try:
                score = self.fn(it.response, it.gold)
            except Exception as e:  # noqa: BLE001 - on one model output: scored 0.0 and counted, as any grader's
                verdicts.append(error_verdict(e))
                continue
            verdicts.append(self._verdict(score, i, it))
        return verdicts

    def _call(self, response, gold, what: str):
        try:
            return self.fn(response, gold)
        except Exception as e:
            raise GraderFunctionError(f"grader {self.name} raised on {what}: {type(e).__name__}: {e}") from e

    def _verdict(self, score, index: int, item: GradeItem) -> Verdict:
        if getattr(score, "ndim", None) == 0 and hasattr(score, "item"):  # a numpy or torch scalar
            score = score.item()
        ok = isinstance(score, numbers.Real) and math.isfinite(score) and 0.0 <= score <= 1.0
        if not ok:
            kind = type(score).__name__
            raise GraderFunctionError(f"grader {self.name} returned {score!r} ({kind}) for item {index} "
                                      f"(gold {item.gold!r}); expected a number in [0, 1]")
        score = float(score)
        return Verdict(score, "correct" if score == 1.0 else "wrong" if score == 0.0 else "partial", "")
