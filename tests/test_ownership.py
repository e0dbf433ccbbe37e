"""Nothing the user owns is deleted: run folders, exports, checkpoints, the SFT cache and eval
output are replaced only when they hold zppo_fast's marker (zppo_fast/ownership.py)."""

import json
import os
import re
import warnings

import pytest

from zppo_fast import ownership
from zppo_fast.checkpoint import STATE_FILE, prune
from zppo_fast.config import ConfigError
from zppo_fast.ownership import MARKER, NotOursError


def users_folder(path):
    """A folder of the user's: a file and a sub-folder, no marker."""
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "x.csv").write_text("1,2\n")
    return path


def refused(capsys, main, argv, pattern):
    """`main(argv)` ends as a bad argument does: exit 2, one line on stderr matching `pattern`."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and re.search(pattern, err), err


def intact(path) -> bool:
    return ((path / "thesis.tex").read_text() == "years of work" and (path / "data" / "x.csv").read_text() == "1,2\n"
            and not (path / MARKER).exists())


# --- the rules, on plain folders ---------------------------------------------------------------


def test_claim_makes_marks_and_replaces_only_marked_folders(tmp_path):
    new = ownership.claim(tmp_path / "a" / "new", "run")
    assert ownership.kind_of(new) == "run" and os.listdir(new) == [MARKER]
    (tmp_path / "empty").mkdir()
    assert ownership.kind_of(ownership.claim(tmp_path / "empty", "eval")) == "eval"
    (new / "metrics.jsonl").write_text("{}\n")
    assert os.listdir(ownership.claim(new, "run")) == [MARKER]  # its own kind: emptied and reused
    with pytest.raises(NotOursError, match=r"zppo_fast run folder .* not export output"):
        ownership.claim(new, "export")
    assert ownership.kind_of(ownership.claim(new, "export", overwrite=True)) == "export"

    mine = users_folder(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(NotOursError, match=rf"{mine} already exists: it is a folder holding data/, thesis\.tex, "
                                               rf"and has no \.zppo_fast marker"):
            ownership.claim(mine, "run", overwrite=overwrite)
        assert intact(mine)
    (tmp_path / "file.txt").write_text("keep")
    with pytest.raises(NotOursError, match="it is a file"):
        ownership.claim(tmp_path / "file.txt", "eval")
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    with pytest.raises(NotOursError, match="it is a link"):
        ownership.claim(tmp_path / "link", "run", overwrite=True)
    assert (tmp_path / "file.txt").read_text() == "keep" and intact(mine)


def test_a_long_listing_is_cut(tmp_path):
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(12):
        (crowded / f"f{i:02d}").write_text("")
    with pytest.raises(NotOursError, match=r"f00, f01, f02, f03, f04, \.\.\. \(12 entries\)"):
        ownership.check_claim(crowded, "run")


def test_remove_and_replace_refuse_unmarked_folders(tmp_path):
    mine = users_folder(tmp_path / "mine")
    with pytest.raises(NotOursError, match="was to be deleted"):
        ownership.remove(mine)
    new = ownership.mark(tmp_path / "new", "export")
    (new / "model.safetensors").write_text("weights")
    with pytest.raises(NotOursError, match="was to be replaced"):
        ownership.replace(new, mine)
    assert intact(mine) and (new / "model.safetensors").is_file()
    old = ownership.mark(tmp_path / "old", "export")
    assert ownership.replace(new, old) == old and (old / "model.safetensors").read_text() == "weights"
    assert sorted(os.listdir(tmp_path)) == ["mine", "old"]  # nothing left aside
    with pytest.raises(ValueError, match="no .zppo_fast marker"):
        ownership.replace(mine, tmp_path / "elsewhere")


def test_pruning_keeps_checkpoints_without_the_marker(tmp_path):
    old = tmp_path / "checkpoints" / "step_1"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_text("")
    with pytest.warns(UserWarning, match=r"not deleting old checkpoint .*step_1: it has no \.zppo_fast marker"):
        prune(old)
    assert (old / STATE_FILE).is_file()
    ownership.mark(old, "checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(old)
    assert not old.exists()


def test_sft_cache_and_eval_output_refuse_the_users_folders(tmp_path, capsys):
    from zppo_fast.engine import SamplingParams
    from zppo_fast.eval import evaluate_files
    from zppo_fast.eval import main as eval_main
    from zppo_fast.sft import _save_atomically

    entry = tmp_path / "cache" / "sft-0123"
    mine = users_folder(tmp_path / "cache" / "sft-0123.tmp")
    with pytest.raises(NotOursError, match="sft-0123.tmp already exists"):
        _save_atomically(None, None, entry)  # refused before any model is written
    assert intact(mine) and not entry.exists()

    out = users_folder(tmp_path / "eval_out")
    with pytest.raises(NotOursError, match="eval_out already exists"):
        evaluate_files(None, None, [str(tmp_path / "test.jsonl")], SamplingParams(), out_dir=out, progress=False)
    refused(capsys, eval_main, ["--model", str(tmp_path / "no_model"), "--data", "x.jsonl", "--out", str(out)],
            r"eval_out already exists: .*thesis\.tex")  # before loading
    assert intact(out)


# --- the trainer and export --------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_train_refuses_a_users_folder_as_run_folder(tmp_path, overwrite, monkeypatch, capsys):
    from zppo_fast.train import main

    mine = users_folder(tmp_path / "mine")
    refused(capsys, main, ["--run.out_dir", str(mine), "--run.overwrite", overwrite],
            rf"{mine} already exists: it is a folder holding data/, thesis\.tex")
    assert intact(mine)
    monkeypatch.chdir(mine)  # `--run.out_dir .`: the working directory
    refused(capsys, main, ["--run.out_dir", ".", "--run.overwrite", overwrite], r"error: \. already exists")
    assert intact(mine)


def test_rerun_with_overwrite_and_export(tiny_config, tmp_path):
    from zppo_fast.export import main as export
    from zppo_fast.train import Trainer

    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    trainer.fit()
    run = trainer.run_dir
    checkpoint = run / "checkpoints" / "step_1"
    assert ownership.kind_of(run) == "run" and ownership.kind_of(checkpoint) == "checkpoint"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(tiny_config("--run.steps", "1"), progress=False)
    (run / "stale.txt").write_text("from the first run")
    again = Trainer(tiny_config("--run.steps", "1", "--run.overwrite", "true"), progress=False)
    assert again.run_dir == run and not (run / "stale.txt").exists() and not (run / "checkpoints").exists()
    again.fit()
    assert (run / "checkpoints" / "step_1" / STATE_FILE).is_file() and ownership.kind_of(run) == "run"

    mine = users_folder(tmp_path / "mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=rf"^error: {mine} already exists: it is a folder holding data/, thesis"):
            export([str(checkpoint), str(mine), *extra])
        assert intact(mine)
    with pytest.raises(SystemExit, match=r"zppo_fast run folder .* not export output"):
        export([str(checkpoint), str(run)])
    exported = tmp_path / "exported"
    for _ in range(2):  # a previous export is replaced
        export([str(checkpoint), str(exported)])
        assert ownership.kind_of(exported) == "export" and (exported / "model.safetensors").is_file()
        assert json.loads((exported / "config.json").read_text())["model_type"]
    assert sorted(os.listdir(tmp_path)) == ["exported", "mine", "run"]  # no temporary folder left beside


def test_every_removal_in_zppo_fast_goes_through_ownership():
    """The rule holds only if nothing else deletes: the package's sources name no other deleting call
    (engine_process unlinks the shared-memory file it created with mkstemp)."""
    from pathlib import Path

    import zppo_fast

    allowed = {"ownership.py": {"shutil.rmtree(", ".rename("}, "engine_process.py": {".unlink("},
               "train.py": {".rename("}}  # train.py: its own telemetry files, written beside and renamed
    for source in Path(zppo_fast.__file__).parent.glob("*.py"):
        text = source.read_text()
        for call in ("shutil.rmtree(", "os.remove(", "os.unlink(", ".unlink(", "os.rmdir(", ".rmdir(", ".rename(",
                     "os.replace(", "shutil.move("):
            if call in text and call not in allowed.get(source.name, set()):
                if not (source.name == "ownership.py" and call == ".rmdir("):  # an empty folder only
                    raise AssertionError(f"{source.name} calls {call}: delete only through zppo_fast/ownership.py")
