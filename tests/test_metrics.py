"""Metrics sinks: metrics.jsonl, and Weights & Biases offline (run.wandb) read back from its own files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zppo_fast.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
STEPS = {1: {"loss/policy": 0.25, "reward/mean": 0.5, "eval/x_acc": float("nan")},
         2: {"loss/policy": -0.125, "reward/mean": 0.75}}


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header, then
    32 KiB blocks of chunks, each a 4-byte checksum, a 2-byte little-endian length, a 1-byte kind:
    1 whole record, 2/3/4 its first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(run_folder):
    (log,) = run_folder.glob("run-*.wandb")
    rows = []
    for r in wandb_records(log):
        if r.WhichOneof("record_type") == "history":
            # W&B stores a key whole (`key`) or as its parts (`nested_key`, "loss/policy" -> ["loss/policy"])
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})  # W&B's own _step, _runtime
    return rows


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """wandb installed, WANDB_MODE unset (the logger's offline default applies), its settings and
    caches in the test's folder rather than the home directory."""
    wandb = pytest.importorskip("wandb", reason="wandb is in the test extra; install it to run this test")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    return wandb


# Run in a child process, so that what W&B does at interpreter exit is watched too: an audit hook
# reports every host-name lookup and every connection that is not to a local (Unix) socket.
CHILD = """
import json, math, socket, sys
from pathlib import Path

def audit(event, args):
    if event == "socket.getaddrinfo" or (event == "socket.connect" and args[0].family != socket.AF_UNIX):
        print("NETWORK", event, args[1:], file=sys.stderr, flush=True)

sys.addaudithook(audit)
from zppo_fast.metrics import MetricsLogger

run_dir, steps = Path(sys.argv[1]), {int(k): v for k, v in json.loads(sys.argv[2]).items()}
logger = MetricsLogger(run_dir, tensorboard=False, wandb=True, wandb_project="zppo_test",
                       config={"rl": {"algo": "zppo", "lr": 3e-4}})
mode, first = logger.wandb.settings.mode, logger.wandb.id
for step, metrics in steps.items():
    logger.log(step, {k: math.nan if v is None else v for k, v in metrics.items()})
logger.close()
logger = MetricsLogger(run_dir, tensorboard=False, resume_step=1, wandb=True, wandb_project="zppo_test")
logger.log(2, {"loss/policy": 0.5})
logger.close()
print(json.dumps({"mode": mode, "first": first, "resumed": logger.wandb.id}))
"""


def test_wandb_offline_run_writes_its_files(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    steps = {str(s): {k: None if v != v else v for k, v in m.items()} for s, m in STEPS.items()}  # NaN as null
    child = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), json.dumps(steps)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "NETWORK" not in child.stderr, [x for x in child.stderr.splitlines() if "NETWORK" in x]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["mode"] == "offline"
    run_id = out["first"]
    # metrics.jsonl is written as before (NaN as null); the resumed run dropped the line past step 1.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss/policy": 0.25, "reward/mean": 0.5, "eval/x_acc": None},
                     {"step": 2, "loss/policy": 0.5}]
    # W&B: offline run folders under RUN_DIR/wandb holding exactly the logged steps, the NaN left out;
    # the resumed run continues the same W&B run id.
    assert out["resumed"] == run_id and (run_dir / "wandb" / "run_id").read_text().strip() == run_id
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    (resumed,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}-part2")
    assert history(first) == [{"step": s, **{k: v for k, v in m.items() if v == v}} for s, m in STEPS.items()]
    assert history(resumed) == [{"step": 2, "loss/policy": 0.5}]
    records = wandb_records(next(first.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.project == "zppo_test" and run.display_name == "run"
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    assert config["rl"] == {"algo": "zppo", "lr": 3e-4}


def test_wandb_asked_for_but_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    with pytest.raises(ImportError, match=r"run.wandb = true needs the wandb package: pip install wandb"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)
    assert not (tmp_path / "wandb").exists()
    MetricsLogger(tmp_path, tensorboard=False).close()  # not asked for: nothing needed

    from zppo_fast.config import load_config
    from zppo_fast.train import Trainer

    with pytest.raises(ImportError, match=r"run.wandb = true needs the wandb package"):
        Trainer(load_config(None, ["--run.wandb", "true", "--run.out_dir", str(tmp_path / "run")]), progress=False)
    assert not (tmp_path / "run").exists()  # it failed before touching the run folder
