"""The command line of every entry point (zppo_fast/cli.py): --help, misspelled options, bad values.

In-process (each module's `main`), so the suite pays no interpreter start per case; one subprocess
checks that `python -m` itself ends with one line and no traceback.
"""

import dataclasses
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from zppo_fast.cli import config_keys
from zppo_fast.config import AdvantageMode, AlgoName, ConfigError, check_config, load_config

ENTRY_POINTS = ("train", "sft", "eval", "export", "report")
ROOT = Path(__file__).resolve().parent.parent


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m zppo_fast.<module> *argv`, run in this process."""
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"zppo_fast.{module}").main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (the trainer, the SFT warm-up) fails the test: a bad value must stop before."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad value was rejected")

    monkeypatch.setattr("zppo_fast.train.Trainer", built)
    monkeypatch.setattr("zppo_fast.sft.prepare_warm_starts", built)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0_on_every_entry_point(module, capsys):
    code, out, err = run_main(module, ["--help"], capsys)
    assert code == 0 and not err
    assert out.startswith(f"usage: python -m zppo_fast.{module} ")
    if module in ("train", "sft"):
        # Every key, with its type, range, default, and the comment beside (or above) it in config.py.
        assert "  rl.group_size: int >= 1 = 8\n      G_S: rollouts per question\n" in out
        assert "  zppo.rho_aug: float in [0, 1] = 0.25\n" in out
        assert "  rl.advantage_mode: batch_wo_zero | batch_w_zero | none | group = \"batch_wo_zero\"\n" in out
        assert "normalization of r - mean(group)" in out  # the comment block above advantage_mode
        missing = [k for k in config_keys() if f"  {k[2:]}: " not in out]
        assert not missing, f"keys missing from --help: {missing}"


@pytest.mark.parametrize("module, argv, closest", [
    ("train", ["--rl.grup_size", "3"], "rl.group_size"),
    ("train", ["--group_size", "3"], "--rl.group_size"),
    ("sft", ["--sft.step", "3"], "sft.steps"),
    ("sft", ["--confg", "x.toml"], "--config"),
    ("eval", ["--sampels", "2", "--model", "m", "--data", "d.jsonl"], "--samples"),
    ("eval", ["--sampels", "2"], "--samples"),  # named before argparse misses the required --model
    ("export", ["--dtpye", "bfloat16", "ckpt", "out"], "--dtype"),
    ("report", ["--hepl"], "--help"),
])
def test_a_misspelled_option_names_the_closest(module, argv, closest, capsys, no_model):
    code, out, err = run_main(module, argv, capsys)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith(f"python -m zppo_fast.{module}: error: "), err
    assert "did you mean" in err and closest in err.split("did you mean", 1)[1], err


BAD_VALUES = [
    # The six of issue 14, each of which used to end in a traceback after the model was built.
    (["--rl.group_size", "0"], "'rl.group_size' must be >= 1, got 0"),
    (["--rl.batch_size", "-1"], "'rl.batch_size' must be >= 1, got -1"),
    (["--rl.eps_high", "-1"], "'rl.eps_high' must be >= 0"),
    (["--rl.lr", "nan"], "'rl.lr' must be a finite number"),
    (["--rl.advantage_mode", "foo"], "'rl.advantage_mode' must be one of 'batch_wo_zero'"),
    (["--rollout.temperature", "-1"], "'rollout.temperature' must be >= 0"),
    # Ranges.
    (["--rl.eps_low", "-0.1"], "'rl.eps_low' must be >= 0"),
    (["--rl.dual_clip", "1"], "'rl.dual_clip' must be > 1"),
    (["--rl.lr", "0"], "'rl.lr' must be > 0"),
    (["--rl.lr=inf"], "'rl.lr' must be a finite number"),
    (["--rl.num_minibatches", "0"], "'rl.num_minibatches' must be >= 1"),
    (["--rollout.top_p", "0"], "'rollout.top_p' must be in (0, 1]"),
    (["--rollout.top_p", "1.5"], "'rollout.top_p' must be in (0, 1]"),
    (["--zppo.rho_aug", "1.5"], "'zppo.rho_aug' must be in [0, 1]"),
    (["--zppo.rho_replay", "-0.25"], "'zppo.rho_replay' must be in [0, 1]"),
    (["--zppo.hard_threshold", "2"], "'zppo.hard_threshold' must be in [0, 1]"),
    (["--zppo.replay_capacity", "0"], "'zppo.replay_capacity' must be >= 1"),
    (["--run.steps", "0"], "'run.steps' must be >= 1"),
    (["--run.checkpoint_every", "0"], "'run.checkpoint_every' must be >= 1"),
    (["--task.num_terms", "1"], "'task.num_terms' must be >= 2"),
    # Choices.
    (["--rl.algo", "zpo"], "'rl.algo' must be one of 'grpo'"),
    (["--rollout.engine", "vllm"], "'rollout.engine' must be one of 'transformers', 'sglang'"),
    (["--rollout.teacher_placement", "remote"], "'rollout.teacher_placement' must be one of"),
    (["--zppo.compression", "summary"], "'zppo.compression' must be one of 'teacher', 'none'"),
    (["--run.device", "tpu"], "'run.device' must be one of 'auto', 'cpu', 'cuda'"),
    (["--model.dtype", "float8"], "'model.dtype' must be one of"),
    (["--data.grader", "boxd"], "'data.grader' must be one of auto, boxed, choice"),
    (["--data.heldout_grader", "my_rewards:"], "'data.heldout_grader' must be one of"),
    # Types, and the command line's own mistakes.
    (["--rl.group_size", "2.5"], "'rl.group_size' expects int"),
    (["--run.tensorboard", "maybe"], "'run.tensorboard' expects bool"),
    (["--rl.lr"], "'--rl.lr' needs a value"),
    (["--resume", "no/such/run"], "--resume no/such/run: no config.json there"),
    (["--resume", "r", "--config", "c.toml"], "--resume takes the run's own config.json"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_rejected_at_load(argv, message, capsys, no_model):
    code, out, err = run_main("train", argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_values_in_a_config_file_and_on_sft(tmp_path, capsys, no_model):
    toml = tmp_path / "c.toml"
    toml.write_text("[rl]\ngroup_size = 0\n")
    code, _, err = run_main("sft", ["--config", str(toml)], capsys)
    assert code == 2 and "'rl.group_size' must be >= 1, got 0" in err
    code, _, err = run_main("sft", ["--sft.lr", "-3e-3"], capsys)
    assert code == 2 and "'sft.lr' must be > 0" in err


def test_eval_checks_its_options_before_loading_a_model(capsys):
    base = ["--model", "no/model", "--data", "d.jsonl"]
    for argv, message in ((["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0.0"),
                          (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
                          (["--temperature", "nan"], "argument --temperature: must be a finite number"),
                          (["--grader", "boxd"], "argument --grader: must be one of auto, boxed")):
        code, _, err = run_main("eval", base + argv, capsys)  # no/model does not exist: a load would fail else
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_valid_values_pass():
    cfg = load_config(None, ["--data.grader", "my_rewards:exact", "--data.heldout_grader", "path/to/r.py:fn",
                             "--rl.dual_clip", "1.5", "--rollout.top_p", "1", "--zppo.rho_aug", "0",
                             "--rl.group_size", "1", "--rollout.temperature", "0", "--run.keep_last", "0"])
    assert cfg.data.grader == "my_rewards:exact" and cfg.rollout.top_p == 1.0 and cfg.rl.group_size == 1


def test_a_config_changed_in_code_is_checked():
    cfg = load_config(None, [])
    bad = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, group_size=0))
    with pytest.raises(ConfigError, match="'rl.group_size' must be >= 1, got 0"):
        check_config(bad)


def test_choices_match_what_the_code_implements():
    from zppo_fast.kernels import ADVANTAGE_MODES
    from zppo_fast.zppo import ALGOS

    assert set(typing.get_args(AlgoName)) == set(ALGOS)
    assert set(typing.get_args(AdvantageMode)) == set(ADVANTAGE_MODES)


def test_python_m_ends_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "zppo_fast.train", "--rl.group_size", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # The error is the last line (a dependency's import-time warning, on some machines, may precede it).
    expected = "python -m zppo_fast.train: error: config key 'rl.group_size' must be >= 1, got 0"
    assert proc.stderr.splitlines()[-1] == expected
