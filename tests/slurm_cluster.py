"""A private, real, single-node Slurm for the tests: munged, slurmctld and slurmd started from
Debian's packages (installed by cluster/slurm/dev/install-local-slurm.sh) with a config, state,
spool and munge socket of their own under a temp dir, on free ports; stopped by PID.

    cluster = start_slurm()        # raises SlurmUnavailable with the reason when it cannot
    cluster.run("sbatch", ...)     # client commands with SLURM_CONF pointing at our config
    cluster.stop()
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "cluster" / "slurm" / "dev" / "install-local-slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine (the reason is the message)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install() -> None:
    """Install slurmctld, slurmd, the clients and munge unless they are already there."""
    if all(shutil.which(name) or shutil.which(name, path="/usr/sbin") for name in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing needs root: "
                               f"run {INSTALL_SCRIPT.relative_to(ROOT)} as root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise SlurmUnavailable(f"{INSTALL_SCRIPT.name} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")


def real_memory_mb() -> int:
    """90% of what slurmd measures: a RealMemory above the real amount marks the node invalid."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    total = int(out.split("RealMemory=")[1].split()[0])
    return int(total * 0.9)


def _which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SlurmUnavailable(f"{name} not found after installing")
    return path


def _alive(pid: int) -> bool:
    """Running and not a zombie (a dead daemon may linger as one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    munged_pid: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *command: str, check: bool = True, **env: str) -> str:
        result = subprocess.run([_which(command[0]), *command[1:]], capture_output=True,
                                text=True, env=self.env(**env), timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: "
                               f"{result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = {}
        for token in self.run("scontrol", "show", "job", "--oneliner", job_id).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        if self.munged_pid and _alive(self.munged_pid):
            os.kill(self.munged_pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(self.munged_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


SLURM_CONF = """\
ClusterName=t2t-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=3600
KillWait=30
JobRequeue=1
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm(timeout: float = 60.0) -> SlurmCluster:
    """Install if needed, configure and start a one-node Slurm; returns when the node is idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm runs its daemons as root; run the tests as root")
    install()
    root = Path(tempfile.mkdtemp(prefix="t2t-slurm-"))
    root.chmod(0o755)  # munged runs as `munge` and must reach its own subfolder
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", node=node, cpus=os.cpu_count() or 1)
    try:
        cluster.munged_pid = _start_munged(root / "munge")
        cluster.conf.write_text(SLURM_CONF.format(
            node=node, ctld_port=free_port(), slurmd_port=free_port(),
            munge_socket=root / "munge" / "munge.socket", root=root, cpus=cluster.cpus,
            memory=real_memory_mb()))
        for name in ("slurmctld", "slurmd"):
            log = open(root / "log" / f"{name}.stdout", "wb")
            cluster.processes[name] = subprocess.Popen(
                [_which(name), "-D", "-f", str(cluster.conf)], stdout=log,
                stderr=subprocess.STDOUT, env=cluster.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in cluster.processes.items():
                if process.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited {process.returncode}: {cluster.log(name)}")
            state = cluster.run("scontrol", "show", "node", node, check=False)
            if "State=IDLE" in state:
                return cluster
            time.sleep(0.5)
        raise SlurmUnavailable(f"node {node} not idle in {timeout:.0f}s: {state.strip()[:500]}")
    except BaseException:
        cluster.stop()
        raise


def _start_munged(folder: Path) -> int:
    """munged as the `munge` user, with its own key, socket and pid file; returns its PID."""
    try:
        munge = pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("user `munge` missing: the munge package is not installed") from None
    folder.mkdir()
    folder.chmod(0o711)  # munged: the socket folder must be searchable by all
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (folder, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    command = ["runuser", "-u", "munge", "--", _which("munged"), f"--socket={folder}/munge.socket",
               f"--key-file={key}", f"--pid-file={folder}/munged.pid",
               f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise SlurmUnavailable(f"munged failed to start: {result.stderr.strip()}")
    pid_file = folder / "munged.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(pid_file.read_text())
