"""finetune.cli.run, the console entry point: it exits without the interpreter's teardown (os._exit), so it must
run the atexit handlers and flush what was printed itself, and keep the exit code; while a thread Python would wait
for is alive, it exits normally (the thread finishes)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROGRAM = """
import atexit, sys, threading, time

atexit.register(lambda: print(" atexit ran", end=""))
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print(" thread finished", end=""))).start()
print("before", end="")  # still in the buffer when run() exits
sys.argv = ["finetune", "validate", "--recipe", "/nonexistent/recipe.yaml"]
from finetune.cli import run
run()
"""


def test_the_console_entry_skips_teardown_but_not_atexit_output_or_exit_code():
    for mode in ("plain", "thread"):
        result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 2, result.stderr  # validate's user error
        assert "/nonexistent/recipe.yaml" in result.stderr and "Traceback" not in result.stderr
        assert result.stdout.startswith("before") and " atexit ran" in result.stdout, result.stdout
        assert (" thread finished" in result.stdout) == (mode == "thread"), result.stdout
