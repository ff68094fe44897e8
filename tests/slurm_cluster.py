"""A real one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd
from Debian's packages, every file under one temporary directory, stopped afterwards."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)  # polling a condition, with a deadline
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def start(self) -> "SlurmCluster":
        ensure_installed()
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        subprocess.run(["munged", "--force", f"--socket={r / 'munge.socket'}", f"--key-file={key}",
                        f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge.seed'}"], check=True)
        self.pids.append(int(wait_for(lambda: _read(r / "munged.pid"), 10, "munged")))
        self.conf.write_text(self._conf())
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(int(wait_for(lambda: _read(r / "slurmctld.pid"), 20, "slurmctld")))
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(int(wait_for(lambda: _read(r / "slurmd.pid"), 20, "slurmd")))
        wait_for(lambda: self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() == "idle", 60,
                 "the node to become idle")
        return self

    def stop(self) -> None:
        self.run(["scancel", "--user", "root"], check=False)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            wait_for(lambda: not _alive(pid), 30, f"process {pid} to stop")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})},
                              check=check, **kw)

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        out = self.run(["sbatch", "--parsable", *map(str, args)], env=env or {}, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        text = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        return wait_for(lambda: (j := self.job(job_id)) and j.get("JobState") in states and j, timeout,
                        f"job {job_id} to reach {states}")

    def _conf(self) -> str:
        r = self.root
        return f"""ClusterName=distrain-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r / 'munge.socket'}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AcctGatherEnergyType=acct_gather_energy/none
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
KillWait=30
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
        return text or None
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z" if Path(f"/proc/{pid}").exists() else False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
