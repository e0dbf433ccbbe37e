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
    from pathlib import Path

    for f in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        load_config(f)
