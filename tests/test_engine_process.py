"""Engines in child processes of their own (zppo_fast/engine_process.py): environment, death,
shutdown and start failures, with real processes. The transformers engine in a child runs the
whole engine contract in tests/test_engine_contract.py."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from engine_factories import ProcessProbe, failing_engine

from zppo_fast.engine import EngineDiedError
from zppo_fast.engine_process import EngineProcess, engine_environment, reserve_port


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_engine_environment_drops_torchrun_and_maps_gpus():
    base = {"PATH": "/bin", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "0", "CUDA_VISIBLE_DEVICES": "3,5,7"}
    env = engine_environment([1, 2], {"EXTRA": "1"}, base=base)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "5,7", "EXTRA": "1"}
    assert engine_environment([0], base={"PATH": "/bin"})["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in engine_environment(None, base={"RANK": "0"})
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES='3,5,7' shows 3"):
        engine_environment([3], base=base)


def test_reserved_port_can_be_bound_by_the_engine():
    """The reserved port is not handed out to other port-0 binds, and a listener that sets
    SO_REUSEADDR (as torch's TCPStore does) binds it at once."""
    import socket

    port = reserve_port()
    others = set()
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            others.add(s.getsockname()[1])
    assert port not in others
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)


def test_killed_engine_raises_engine_died_error_without_hanging(tmp_path):
    log = tmp_path / "probe.log"
    eng = EngineProcess(ProcessProbe, "probe engine", log_path=log)
    try:
        pid, _ = eng.call("ids")
        result = {}

        def long_call():
            try:
                eng.call("sleep", 600)
            except Exception as e:  # noqa: BLE001 - the test inspects it
                result["error"] = e

        worker = threading.Thread(target=long_call)
        worker.start()
        time.sleep(1.0)  # the call is in flight in the child
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=30)
        assert not worker.is_alive(), "the call hung on a dead engine"
        err = result["error"]
        assert isinstance(err, EngineDiedError)
        assert f"process {pid} was killed by SIGKILL during sleep" in str(err) and str(log) in str(err)
        with pytest.raises(EngineDiedError, match="not running"):
            eng.call("ids")
    finally:
        eng.shutdown()


def test_shutdown_ends_only_its_own_processes(tmp_path):
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    a = EngineProcess(ProcessProbe, "engine a", log_path=tmp_path / "a.log")
    b = EngineProcess(ProcessProbe, "engine b", log_path=tmp_path / "b.log")
    try:
        a_pid, a_group = a.call("ids")
        b_pid, b_group = b.call("ids")
        assert a_group == a_pid and b_group == b_pid and a_group != os.getpgid(0), "each in a group of its own"
        grandchild = a.call("spawn")
        assert alive(grandchild)
        a.shutdown()
        assert wait_dead(a_pid) and wait_dead(grandchild), "the engine and what it started are gone"
        assert alive(b_pid) and b.call("ids") == (b_pid, b_group), "the other engine still answers"
        assert sibling.poll() is None, "the trainer's other child is untouched"
    finally:
        a.shutdown()
        b.shutdown()
        sibling.kill()
        sibling.wait()


def test_a_failing_start_raises_the_engines_error(tmp_path):
    log = tmp_path / "fail.log"
    with pytest.raises(ValueError, match=r"architectures \['Nope'\] are not served \[failing engine, start"):
        EngineProcess(failing_engine, "failing engine", log_path=log)
    assert "Traceback" in log.read_text() and "not served" in log.read_text()


def test_engine_child_under_torchrun_gets_no_torchrun_variables(tmp_path):
    """Under real torchrun, the rank's engine child starts without the variables that
    make SGLang's schedulers hang (TORCHELASTIC_USE_AGENT_STORE) or describe the trainer's world."""
    import json
    from pathlib import Path

    from test_distributed import HERE, finish, torchrun

    out = tmp_path / "env.json"
    finish(torchrun(1, str(HERE / "dist_worker.py"), "engine_env", str(out)))
    env = json.loads(out.read_text())
    assert env["rank"]["TORCHELASTIC_USE_AGENT_STORE"] == "True" and "MASTER_PORT" in env["rank"], \
        "the rank itself runs under torchrun"
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "ROLE_RANK")
    leaked = {k for k in env["engine"] if k in torchrun or k.startswith("TORCHELASTIC_")}
    assert not leaked, f"torchrun variables reached the engine: {sorted(leaked)}"
    assert env["engine"]["PATH"] == env["rank"]["PATH"], "the rest of the environment is inherited"
    assert Path(env["engine"]["PYTHONPATH"]).exists()


def test_engine_dies_with_the_trainer(tmp_path):
    """A trainer killed without a shutdown takes its engine along (no orphaned engine holding GPUs)."""
    script = ("import os, sys, time\n"
              "from engine_factories import ProcessProbe\n"
              "from zppo_fast.engine_process import EngineProcess\n"
              "engine = EngineProcess(ProcessProbe, 'probe')\n"
              "print(engine.call('ids')[0], flush=True)\n"
              "time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    trainer = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(trainer.stdout.readline())
        assert alive(engine_pid)
        trainer.kill()
        trainer.wait()
        assert wait_dead(engine_pid), "the engine outlived the trainer"  # SGLang's schedulers die with it
    finally:
        trainer.kill()
        trainer.wait()
