"""Engines for the process-level tests of zppo_fast/engine_process.py, built in the engine's child.

`ProcessProbe` answers what the process-level contract is about (its environment, its process
group, a call that takes time, a process it starts), so those tests do not need a model.
"""

import os
import subprocess
import sys
import time


class ProcessProbe:
    name = "process probe"

    def __init__(self):
        self.children = []

    def environ(self) -> dict:
        return dict(os.environ)

    def ids(self) -> tuple[int, int]:
        return os.getpid(), os.getpgid(0)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def spawn(self) -> int:
        """Start a grandchild, as SGLang starts its schedulers; it inherits the engine's group."""
        self.children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return self.children[-1].pid


def failing_engine():
    raise ValueError("config.json: architectures ['Nope'] are not served")
