"""A real SLURM cluster on this machine for tests: munged, slurmctld and one slurmd per node.

Debian's slurm 22.05 is installed with apt-get when missing (root only). Every file of the cluster
(configuration, state, spool, pid and log files, the munge socket) lives under one folder, daemons
listen on free local ports, and clients find the cluster through ``SLURM_CONF`` in :meth:`env`, so
several clusters (e.g. two CI runs) can coexist and nothing of the host's setup is touched.
Nodes are ``n1``, ``n2``... on 127.0.0.1 with distinct ports (Debian builds slurmd with
multiple-slurmd support); their names do not resolve, so jobs must get MASTER_ADDR from the node's
``NodeAddr`` (the project's sbatch templates do).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ("slurm-wlm", "slurmd", "slurmctld", "slurm-client", "munge")
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")

# Variables of the submitting process that sbatch/srun would carry into the job and that would
# mislead Lightning or torch.distributed there (a rank, a world size or a rendezvous of the test's own).
LEAKY_VARIABLES = re.compile(
    r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|PL_|MASTER_ADDR$|MASTER_PORT$|RANK$|LOCAL_RANK$|NODE_RANK$|GROUP_RANK$|"
    r"WORLD_SIZE$|LOCAL_WORLD_SIZE$|TORCHELASTIC_|CUDA_VISIBLE_DEVICES$|WANDB_RUN_ID$|WANDB_SWEEP_ID$)"
)

FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(Exception):
    """This machine cannot host a test cluster (the message says why); tests skip with it."""


def _command(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d, name)).exists()), None)


def ensure_slurm_installed(timeout: float = 600.0) -> None:
    """Install Debian's slurm-wlm and munge when their commands are missing.

    Raises :class:`SlurmUnavailable` when this machine cannot (not root, no apt-get) and
    ``RuntimeError`` when it could but the installation failed.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local SLURM cluster needs root (slurmd, munged, apt-get)")
    missing = [name for name in COMMANDS if _command(name) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM commands {missing} are missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    still_missing = [name for name in COMMANDS if _command(name) is None]
    if still_missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but {still_missing} are still missing")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def scrubbed_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the variables that would leak a rank or a job into a job."""
    env = {k: v for k, v in os.environ.items() if not LEAKY_VARIABLES.match(k)}
    env.update(extra or {})
    return env


class LocalSlurmCluster:
    """Single-machine SLURM cluster; use as a context manager (daemons stop on exit).

    Args:
        root: folder for every file of the cluster (must be empty or absent).
        nodes: node names; each gets its own slurmd on 127.0.0.1.
        cpus_per_node: CPUs declared per node. More than the machine has is allowed
            (``config_overrides``) so that small jobs can share the cores.
        memory_mb: memory declared per node; kept below the machine's or the node drains.
    """

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 4,
                 memory_mb: int | None = None) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        total_mb = psutil.virtual_memory().total // 2**20
        self.memory_mb = memory_mb or min(8192, total_mb // (2 * len(nodes)))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: list[subprocess.Popen] = []
        self._pids: list[int] = []

    # ------------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            "ClusterName=mimtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MessageTimeout=30",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            # Job ids (and so the templates' MASTER_PORT) differ between clusters running side by side.
            f"FirstJobId={random.randint(1000, 900000)}",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for slurm clients and jobs: scrubbed, pointing at this cluster."""
        return scrubbed_environment({"SLURM_CONF": str(self.conf), **(extra or {})})

    def _start_munge(self) -> None:
        folder = self.munge_socket.parent
        folder.mkdir(parents=True, mode=0o755)
        self._spawn([_command("munged"), "--foreground", "--force",
                     f"--socket={self.munge_socket}", f"--pid-file={folder}/munged.pid",
                     f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"], "munged")
        self._wait_for(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    def _spawn(self, args: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self._daemons.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                              start_new_session=True))

    def _wait_for(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{message}: {daemon.args[0]} exited with {daemon.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message}\n{self.logs()}")
            time.sleep(0.1)

    def start(self) -> LocalSlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        self._write_config()
        self._start_munge()
        self._spawn([_command("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
            self._spawn([_command("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}")
        self._wait_for(self._all_nodes_idle, 60, "the SLURM nodes did not become idle")
        return self

    def _all_nodes_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (all at once: each takes a moment to exit)."""
        if any(d.args[0].endswith("slurmctld") and d.poll() is None for d in self._daemons):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env(), capture_output=True, timeout=30)
        running = [d for d in self._daemons if d.poll() is None]
        for daemon in running:
            daemon.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for daemon in running:
            try:
                daemon.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self._daemons.clear()

    def __enter__(self) -> LocalSlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs
    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=env or self.env(), capture_output=True, text=True, timeout=60, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}{done.stdout}")
        return done

    def sbatch(self, script: Path, *options: str, script_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: Path | None = None) -> str:
        """Submit ``script`` with command-line ``options`` (they override its ``#SBATCH`` lines); the job id."""
        done = self.run("sbatch", "--parsable", *options, str(script), *script_args, env=env, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, NodeList, ExitCode, StdOut...)."""
        done = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\S+?)=(\S*)", done.stdout))

    def wait(self, job_id: str, until, timeout: float, poll: float = 0.2) -> dict[str, str]:
        """Poll the job until ``until(job_info)`` holds; raise with the job's state and logs on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(poll)

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        return self.wait(job_id, lambda info: info.get("JobState") in FINISHED_STATES, timeout)
