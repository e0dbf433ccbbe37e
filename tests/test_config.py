from pathlib import Path

import pytest

from zppo_fast.config import ConfigError, load_config


def test_defaults_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[rl]\ngroup_size = 4\nlr = 3e-3\n[model]\npath = "some/dir"\n')
    cfg = load_config(f, ["--rl.group_size", "6", "--run.steps=7", "--model.path", "none", "--run.tensorboard", "off"])
    assert cfg.rl.group_size == 6 and cfg.rl.lr == 3e-3 and cfg.run.steps == 7
    assert cfg.model.path is None and cfg.run.tensorboard is False
    assert cfg.rl.eps_low == 0.2 and cfg.rl.eps_high == 0.28 and cfg.rl.dual_clip == 10.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--rl.grup_size", "3"], "unknown config key 'rl.grup_size' (did you mean rl.group_size"),
        (["--rll.lr", "3"], "unknown config section 'rll' (did you mean rl"),
        (["--rl.group_size", "eight"], "config key 'rl.group_size' expects int, got 'eight'"),
        (["--rl.group_size", "2.5"], "expects int"),
        (["--run.tensorboard", "maybe"], "expects bool"),
        (["--rl.lr"], "needs a value"),
        (["rl.lr", "3"], "expected --section.key VALUE"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[rl\ngroup_size = 4")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[rl]\nclip_hihg = 0.3\n")
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown config key 'rl.clip_hihg'"):
        load_config(typo)


def test_shipped_configs_load():
    for f in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        load_config(f)


GPU_RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("qwen3_5_*.toml"))


def test_gpu_recipes_name_their_data_and_the_papers_run():
    """Table 8: 200 steps of B_new = 384 (one pass over the data), the 27B teacher; data named, so the
    arithmetic task is never what a GPU recipe trains on."""
    assert [f.stem for f in GPU_RECIPES] == ["qwen3_5_0_8b", "qwen3_5_2b", "qwen3_5_9b"]
    for f in GPU_RECIPES:
        cfg = load_config(f)
        assert cfg.data.train and cfg.data.heldout, f
        assert (cfg.run.steps, cfg.rl.batch_size, cfg.rl.group_size, cfg.rl.num_minibatches) == (200, 384, 8, 4), f
        assert cfg.zppo.teacher_path.endswith("Qwen3.5-27B-FP8") and cfg.rl.lr == 1e-6, f


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda f: f.stem)
def test_gpu_recipe_without_its_data_fails_before_any_model_loads(recipe, tmp_path, monkeypatch):
    import zppo_fast.train as train
    from zppo_fast.datasets import DatasetError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data files were checked")

    for name in ("load_model", "model_from_config", "load_tokenizer", "build_transformers_engine", "init_distributed"):
        monkeypatch.setattr(train, name, no_model)
    cfg = load_config(recipe, ["--run.out_dir", str(tmp_path / "run")])
    with pytest.raises(DatasetError, match=f"data file {cfg.data.train[0]} does not exist"):
        train.Trainer(cfg, progress=False)
    # the held-out files are checked as well
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"id": 0, "question": "1 + 1?", "answer": "2"}\n')
    cfg = load_config(recipe, ["--run.out_dir", str(tmp_path / "run"), "--data.train", str(train_file)])
    with pytest.raises(DatasetError, match=f"data file {cfg.data.heldout[0]} does not exist"):
        train.Trainer(cfg, progress=False)
