"""The preemption flag: one signal asks for a checkpoint, a second one means now."""
import subprocess
import sys

from conftest import ROOT, clean_env

SCRIPT = """
import os, signal
from distrain.dist import LocalAgreement
from distrain.preempt import Preemption
p = Preemption(["SIGUSR1"], LocalAgreement())
os.kill(os.getpid(), signal.SIGUSR1)
print("flag", p.should_stop(), flush=True)
os.kill(os.getpid(), signal.SIGUSR1)
print("still alive", flush=True)
"""


def test_first_signal_sets_the_flag_second_one_terminates():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert proc.stdout.splitlines() == ["flag True"]
    assert proc.returncode == -10  # died of SIGUSR1 itself
