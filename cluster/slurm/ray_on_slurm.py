"""Ray on a Slurm allocation: the head on the first node, one worker per other node (each an
``srun`` step), the job on the head, and a clean stop however the allocation ends.

Run by the sbatch scripts beside this file (they only set the environment and resources):

    python cluster/slurm/ray_on_slurm.py [--port-base N] [JOB.py] [JOB ARGS...]

``JOB.py`` defaults to ``jobs/pretrain.py`` (``jobs/sweep.py`` and any other script work the
same way); it gets ``RAY_ADDRESS`` of this cluster. CPUs and GPUs per node come from Slurm
(``SLURM_JOB_CPUS_PER_NODE``, ``SLURM_GPUS_ON_NODE``). How the allocation ends:

- the job exits: Ray is stopped, the job's exit code is ours;
- SIGTERM (``scancel``, the time limit): the job and Ray are stopped, exit 143. Checkpoints
  are complete or not registered (Ray Train records a checkpoint only once every rank wrote
  it), so the last complete one is what a resubmission resumes from;
- SIGUSR1 (``#SBATCH --signal=B:USR1@300``, sent before the time limit or by
  ``scancel --batch --signal=USR1``): the job gets SIGTERM and up to ``T2T_STOP_GRACE_S``
  (240 s) to end: a training job's workers commit a checkpoint within
  ``run.stop_check_every`` steps and stop; then Ray is stopped and the job requeued
  (``scontrol requeue``). The requeued job runs the same command, so the same ``run.name``
  resumes from that checkpoint. Keep the signal's lead above the grace plus Ray's stop.

Ray token auth (``RAY_AUTH_MODE=token``, the sbatch default): the dashboard listens on every
interface of the head, so the job refuses to start (one line, exit 2) when the token is empty,
``RAY_AUTH_TOKEN_PATH`` does not exist, or the token file is open to group or others or
belongs to someone else; ~/.ray/auth_token is created 0600 when missing. Without token auth
the dashboard listens on the head's 127.0.0.1 only. The token is never printed.

Why not ``ray symmetric-run``: it refuses to start when any Ray runs on the node and ends with
``ray stop``, which kills every Ray of the node, other jobs' too (shared nodes); it does not
handle SIGTERM either.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JOB = "jobs/pretrain.py"
HEAD_TIMEOUT_S = 120.0
JOB_GRACE_S = 15.0  # SIGTERM -> SIGKILL for the job; Slurm's KillWait (default 30 s) bounds all
STOP_GRACE_S = 240.0  # after SIGUSR1: time for the job's last checkpoint (T2T_STOP_GRACE_S)
RAY_GRACE_S = 10.0  # per Ray node step
# Port offsets from --port-base (a shared node: every job its own range of 1000).
PORT_OFFSETS = {"port": 0, "dashboard-port": 1, "ray-client-server-port": 2,
                "node-manager-port": 3, "object-manager-port": 4, "dashboard-agent-grpc-port": 5,
                "dashboard-agent-listen-port": 6, "runtime-env-agent-port": 7,
                "metrics-export-port": 8}
WORKER_PORTS = (100, 999)  # --min-worker-port / --max-worker-port offsets
HEAD_ONLY_PORTS = ("port", "dashboard-port", "ray-client-server-port")


def expand_counts(value: str) -> list[int]:
    """Slurm's per-node count list, e.g. ``SLURM_JOB_CPUS_PER_NODE="72(x2),36"`` -> [72, 72, 36]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot read Slurm count list {value!r}: expected e.g. 72(x2),36")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def gpus_per_node(env: dict[str, str]) -> int:
    """GPUs Slurm gave each node: SLURM_GPUS_ON_NODE, else --gpus-per-node (``h100:8``), else 0."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    per_node = env.get("SLURM_GPUS_PER_NODE", "")
    return int(per_node.rsplit(":", 1)[-1]) if per_node else 0


@dataclass(frozen=True, kw_only=True)
class Allocation:
    job_id: str
    nodes: list[str]
    cpus: list[int]  # per node, in the order of `nodes`
    gpus: int  # per node
    restarts: int  # how often Slurm requeued this job

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Allocation":
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_CPUS_PER_NODE")
                   if not env.get(k)]
        if missing:
            raise ValueError(f"{', '.join(missing)} not set: run this inside a Slurm job (sbatch)")
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        cpus = expand_counts(env["SLURM_JOB_CPUS_PER_NODE"])
        if len(cpus) != len(nodes):
            raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={env['SLURM_JOB_CPUS_PER_NODE']!r} does "
                             f"not match the {len(nodes)} nodes of {env['SLURM_JOB_NODELIST']}")
        return cls(job_id=env["SLURM_JOB_ID"], nodes=nodes, cpus=cpus, gpus=gpus_per_node(env),
                   restarts=int(env.get("SLURM_RESTART_COUNT", "0") or 0))


def ray_port_args(port_base: int, *, head: bool) -> list[str]:
    """Explicit ports from ``port_base`` (shared nodes), or none (Ray's defaults)."""
    if not port_base:
        return []
    args = [f"--{name}={port_base + offset}" for name, offset in PORT_OFFSETS.items()
            if head or name not in HEAD_ONLY_PORTS]
    return args + [f"--min-worker-port={port_base + WORKER_PORTS[0]}",
                   f"--max-worker-port={port_base + WORKER_PORTS[1]}"]


RAY = str(Path(sys.executable).parent / "ray")  # the `ray` of the Python running us


def node_step(node: str, ray_args: list[str], log: Path) -> subprocess.Popen:
    """``ray start --block`` on ``node`` as its own srun step (sharing the job's resources).

    srun forwards our SIGTERM to it, and Ray's SIGTERM handler stops the node's processes
    (after draining the node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 3 s here).
    """
    command = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
               f"--output={log}", RAY, "start", "--block", *ray_args]
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3", **os.environ}
    return subprocess.Popen(command, env=env, start_new_session=True)


class TokenError(Exception):
    """The Ray auth token is missing, empty or readable by others: the job must not start."""


def dashboard_host(env: dict[str, str]) -> str:
    """Every interface with token auth (``ray job submit`` from the login node); the head's
    loopback only without it, where anyone reaching the port could run code as us."""
    return "0.0.0.0" if env.get("RAY_AUTH_MODE", "disabled") == "token" else "127.0.0.1"


def write_new_token(path: Path) -> None:
    """A new token (256 random bits, as ``ray get-auth-token --generate`` makes) at ``path``,
    mode 0600 from the start (Ray's own writes it with the umask, often 0644). Linked into
    place complete, so a job starting at the same moment sees the whole token or none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
        os.link(partial, path)
    except FileExistsError:
        pass  # another job made it first: the checks below read theirs
    finally:
        partial.unlink(missing_ok=True)


def check_private(path: Path, origin: str) -> None:
    """Refuse a token file that is not ours alone: another user who can read it can run code
    as us on every node of the cluster."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise TokenError(f"{origin} {path} is not a regular file")
    if info.st_uid != os.getuid():
        raise TokenError(f"{origin} {path} belongs to uid {info.st_uid}, not to you "
                         f"(uid {os.getuid()}): make your own token")
    if info.st_mode & 0o077:
        raise TokenError(f"{origin} {path} is open to group or others "
                         f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path} and make a "
                         f"new token (delete it; the next job creates one), the old one may be known")
    if info.st_size == 0 or not path.read_text().strip():
        raise TokenError(f"{origin} {path} is empty")


def ensure_auth_token(env: dict[str, str], home: Path | None = None) -> str:
    """Check the Ray auth token before anything starts; returns where it comes from, for
    the log (never the token itself).

    With RAY_AUTH_MODE=token (the sbatch default), Ray takes the token from RAY_AUTH_TOKEN,
    else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (a shared home: every node
    and the login node read it). That default file is created 0600 when missing; a token
    that is empty, or a file that group or others can read, stops the job (TokenError).
    """
    if env.get("RAY_AUTH_MODE", "disabled") != "token":
        return "token auth disabled (RAY_AUTH_MODE): the dashboard listens on 127.0.0.1 only"
    if "RAY_AUTH_TOKEN" in env:
        if not env["RAY_AUTH_TOKEN"].strip():
            raise TokenError("RAY_AUTH_TOKEN is set but empty")
        return "token from RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path, origin = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH"
        if not path.exists():
            raise TokenError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
    else:
        home = home or Path(env.get("HOME") or Path.home())
        path, origin = home / ".ray" / "auth_token", "the Ray token file"
        if not path.exists():
            write_new_token(path)
    check_private(path, origin)
    return f"token from {path}"


class Stop(Exception):
    """Raised in the main loop by our signal handlers."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stop(signum, _frame):
    raise Stop(signum)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("T2T_RAY_PORT_BASE", 0)),
                        help="explicit Ray ports base..base+999 (shared nodes); 0 = Ray's defaults")
    parser.add_argument("--temp-root", default=os.environ.get("T2T_RAY_TEMP_ROOT", "/tmp"),
                        help="Ray's temp dir: <temp-root>/ray-<job id>-<restart> on every node")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest or not rest[0].endswith(".py"):
        rest = [DEFAULT_JOB, *rest]
    if args.port_base and not 1024 <= args.port_base <= 64535:
        parser.error(f"--port-base={args.port_base} is invalid: expected 1024..64535")
    return args, rest


def wait_for_head(temp_dir: Path, head: subprocess.Popen, timeout: float) -> None:
    """Until `ray start` has written the cluster address (it does so once the head is up)."""
    deadline = time.monotonic() + timeout
    while not (temp_dir / "ray_current_cluster").exists():
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited {head.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head was not up in {timeout:.0f} s")
        time.sleep(0.5)


def stop(process: subprocess.Popen | None, grace: float, name: str) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only our own children, by PID."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"ray_on_slurm: {name} ignored SIGTERM for {grace:.0f} s, killing it", flush=True)
        process.kill()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    args, job = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        allocation = Allocation.from_env(dict(os.environ))
        # Before any Ray process: a job whose token others can read must not start.
        token_source = ensure_auth_token(dict(os.environ))
    except (ValueError, TokenError, OSError, subprocess.CalledProcessError) as error:
        print(f"ray_on_slurm: error: {error}", file=sys.stderr)
        return 2
    head_node = allocation.nodes[0]
    head_ip = socket.gethostbyname(head_node)
    address = f"{head_ip}:{args.port_base or 6379}"
    # Per attempt: a requeued job must not find the last attempt's files.
    temp_dir = Path(args.temp_root) / f"ray-{allocation.job_id}-{allocation.restarts}"
    logs = Path(os.environ.get("T2T_RAY_LOG_DIR", os.getcwd()))
    print(f"ray_on_slurm: job {allocation.job_id} (restart {allocation.restarts}), "
          f"nodes {' '.join(allocation.nodes)}, CPUs {allocation.cpus}, "
          f"{allocation.gpus} GPUs per node, head {address}, "
          f"{token_source}; running {' '.join(job)}", flush=True)

    common = [f"--temp-dir={temp_dir}", f"--num-gpus={allocation.gpus}", "--disable-usage-stats"]
    head = job_process = None
    workers: list[subprocess.Popen] = []
    requeue, code = False, 1
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, raise_stop)
    try:
        head = node_step(head_node, [
            "--head", f"--node-ip-address={head_ip}", f"--num-cpus={allocation.cpus[0]}",
            f"--dashboard-host={dashboard_host(dict(os.environ))}", *common,
            *ray_port_args(args.port_base, head=True)] + ([] if args.port_base else ["--port=6379"]),
            logs / f"ray-head-{allocation.job_id}.log")
        wait_for_head(temp_dir, head, HEAD_TIMEOUT_S)
        for node, cpus in zip(allocation.nodes[1:], allocation.cpus[1:]):
            workers.append(node_step(node, [f"--address={address}", f"--num-cpus={cpus}", *common,
                                            *ray_port_args(args.port_base, head=False)],
                                     logs / f"ray-worker-{allocation.job_id}-{node}.log"))
        job_process = subprocess.Popen([sys.executable, *job], cwd=os.getcwd(),
                                       env={**os.environ, "RAY_ADDRESS": address})
        while (code := job_process.poll()) is None:
            for step in [head, *workers]:
                if step.poll() is not None:
                    raise RuntimeError(f"a Ray node step exited {step.returncode} during the job")
            time.sleep(1)
        print(f"ray_on_slurm: {job[0]} exited {code}", flush=True)
    except Stop as stop_signal:
        requeue = stop_signal.signum == signal.SIGUSR1
        code = 128 + stop_signal.signum
        print(f"ray_on_slurm: {stop_signal} received: stopping the job"
              + (" (after its last checkpoint)" if requeue else "") + " and Ray"
              + ("; the job will be requeued" if requeue else ""), flush=True)
    except RuntimeError as error:
        print(f"ray_on_slurm: error: {error}", file=sys.stderr, flush=True)
    finally:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # the stop below must run to its end
        # On SIGUSR1 the job has the signal's lead to save its last checkpoint; on SIGTERM
        # Slurm is stopping every step (Ray's too) at the same time, so it gets little.
        stop(job_process, float(os.environ.get("T2T_STOP_GRACE_S", STOP_GRACE_S)) if requeue
             else JOB_GRACE_S, job[0])
        for index, step in enumerate(workers):
            stop(step, RAY_GRACE_S, f"Ray worker on {allocation.nodes[index + 1]}")
        stop(head, RAY_GRACE_S, "the Ray head")
        print("ray_on_slurm: Ray stopped", flush=True)
    if requeue:
        subprocess.run(["scontrol", "requeue", allocation.job_id], check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
