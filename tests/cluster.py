"""Real clusters for the tests, from Debian's packages, with every file (config, state, sockets, logs, keys) in
temporary directories; nothing under /etc or /run of this machine is changed.

- `slurm_cluster`: a single-node Slurm (munged, slurmctld, slurmd) on loopback.
- `two_node_cluster`: two nodes on this machine, each in its own network, UTS and mount namespace (its own
  hostname, /etc/hosts, /run and /dev/shm, one CPU), joined by a veth pair, with an sshd each (key-based root
  login), one slurmd each, slurmctld on the first. The host filesystem is the shared filesystem both nodes see.

Both need root; `slurm_unavailable()`, `mpi_unavailable()` and `namespaces_unavailable()` name what is missing so
that the tests can skip with that reason.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.distributed import free_port

SLURM_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
NODE_BINARIES = ("unshare", "nsenter", "taskset", "ip", "sshd", "ssh", "ssh-keygen", "pdsh")
MUNGE_KEY = Path("/etc/munge/munge.key")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
NODE_NAMES = ("ebnode0", "ebnode1")
NODE_ADDRS = ("10.87.0.1", "10.87.0.2")  # only inside the nodes' network namespaces
PR_SET_PDEATHSIG = 1


def slurm_unavailable() -> str | None:
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)} (Debian: slurmd slurmctld slurm-client munge)"
    if os.geteuid() != 0:
        return "a test Slurm needs root (slurmd starts jobs as their user)"
    if not MUNGE_KEY.is_file():
        return f"{MUNGE_KEY} missing (Debian's munge package creates it; or run `mungekey -c`)"
    return None


def mpi_unavailable() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun missing (Debian: openmpi-bin libopenmpi-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    return None


def namespaces_unavailable() -> str | None:
    """Why a two-node cluster cannot be made here (or None): binaries, root, and a probe namespace."""
    missing = [b for b in NODE_BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    if missing:
        return f"binaries missing: {', '.join(missing)} (Debian: util-linux iproute2 openssh-server pdsh)"
    if os.geteuid() != 0:
        return "network, UTS and mount namespaces for the test nodes need root"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network/UTS/mount namespaces here: {probe.stderr.strip()}"
    return slurm_unavailable() or mpi_unavailable()


@dataclass
class Slurm:
    root: Path
    env: dict  # SLURM_CONF for the clients
    prefix: tuple[str, ...] = ()  # runs the clients on a node of a two-node cluster

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *cmd],
            env={**os.environ, **self.env, **kw.pop("env", {})},
            capture_output=True,
            text=True,
            check=True,
            **kw,
        )

    def sbatch(self, *args: str, env: dict, cwd: Path) -> int:
        return int(self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields["JobState"]

    def wait(self, job_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(1)
        self.run("scancel", str(job_id))
        raise TimeoutError(f"Slurm job {job_id} still {state} after {timeout} s")

    def wait_idle(self, nodes: int, logs: list[Path]) -> None:
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-o", "%T %D").stdout.split() != ["idle", str(nodes)]:
            if time.monotonic() > deadline:
                tails = "\n".join(log.read_text()[-2000:] for log in logs if log.exists())
                raise RuntimeError(f"the test Slurm did not come up within 60 s:\n{tails}")
            time.sleep(0.5)


def _conf(root: Path, nodes: dict[str, str], cpus: int, munge_socket: Path, ports: tuple[int, int]) -> str:
    """slurm.conf for `nodes` (name: address), slurmctld on the first; slurmd files are per node (%n)."""
    (ctld, ctld_addr), names = next(iter(nodes.items())), ",".join(nodes)
    lines = "".join(
        f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory=4000 State=UNKNOWN\n" for name, addr in nodes.items()
    )
    return f"""ClusterName=earlybert-test
SlurmctldHost={ctld}({ctld_addr})
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
MinJobAge=600
{lines}PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _stop(*pid_files: Path) -> None:
    """SIGTERM the daemons of `pid_files` together; SIGKILL any left after 10 s."""
    pids = []
    for pid_file in pid_files:
        try:
            pids.append(int(pid_file.read_text().strip()))
            os.kill(pids[-1], signal.SIGTERM)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 10
    while (left := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running and not a zombie (this machine's init reaps daemons only after a while)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def _munged():
    """A munged of our own (the key of the machine); yields its socket."""
    # munged runs as the munge user, which cannot enter pytest's private (0700) temporary directories.
    munge_dir = Path(tempfile.mkdtemp(prefix="earlybert-munge-"))
    shutil.chown(munge_dir, "munge", "munge")
    munge_dir.chmod(0o711)  # munged: clients need search permission on the socket directory
    munge_socket = munge_dir / "munge.socket"
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                f"--socket={munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--key-file={MUNGE_KEY}",
            ],
            check=True,
        )
        yield munge_socket
    finally:
        _stop(munge_dir / "munged.pid")
        shutil.rmtree(munge_dir, ignore_errors=True)


@contextmanager
def slurm_cluster(root: Path):
    """Start munged, slurmctld and slurmd under `root`; stop them (by their pid files) on exit."""
    root = Path(root)
    (root / "state").mkdir(parents=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    env = {"SLURM_CONF": str(conf)}
    with _munged() as munge_socket:
        conf.write_text(_conf(root, {host: "127.0.0.1"}, os.cpu_count(), munge_socket, (free_port(), free_port())))
        try:
            subprocess.run(["slurmctld", "-f", str(conf)], check=True, env={**os.environ, **env})
            subprocess.run(["slurmd", "-f", str(conf)], check=True, env={**os.environ, **env})
            slurm = Slurm(root, env)
            slurm.wait_idle(1, [root / "slurmctld.log", root / f"slurmd-{host}.log"])
            yield slurm
        finally:
            _stop(root / f"slurmd-{host}.pid", root / "slurmctld.pid")


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    pid: int  # the process holding the node's namespaces
    cpu: int  # the node's one CPU

    def cmd(self, *args: str, cwd: Path | str = "/") -> list[str]:
        """`args` run on this node (in its namespaces, on its CPU), in `cwd` of the shared filesystem. The CPU is
        set here because nsenter keeps the caller's affinity: sshd and slurmd started with all of this machine's
        CPUs would give the ranks they start more intra-op threads (set_cpu_threads) than one node's reference
        run has, and float sums, hence tickets, that differ with the thread count."""
        return [
            *("nsenter", f"--target={self.pid}", "--net", "--uts", "--mount", f"--wd={cwd}", "--"),
            *("taskset", "--cpu-list", str(self.cpu), *args),
        ]

    def processes(self) -> list[int]:
        """Every process in this node's network namespace but its holder."""
        own = os.readlink(f"/proc/{self.pid}/ns/net")
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int(entry.name) != self.pid and os.readlink(entry / "ns/net") == own:
                    pids.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
        return pids


@dataclass
class Cluster:
    root: Path
    nodes: tuple[Node, Node]
    hostfile: Path  # deepspeed's ("name slots=1") and mpirun's format
    slurm: Slurm  # clients run on the first node


# Run inside the new namespaces by `unshare`: the node's own hostname, /etc/hosts, ssh client config, /run, /dev/shm
# and address, then it waits (holding the namespaces) until killed. Nothing here can touch this machine's namespaces.
NODE_INIT = """set -e
hostname "$1"
mount --bind "$2" /etc/hosts
mount --bind "$3" /etc/ssh/ssh_config
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -m 755 /run/sshd
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ip link set lo up
while ! ip link show eth0 >/dev/null 2>&1; do sleep 0.02; done
ip addr add "$4/24" dev eth0
ip link set eth0 up
touch "$5"
exec sleep infinity
"""


def _start_node(root: Path, index: int) -> tuple[Node, subprocess.Popen]:
    name, addr = NODE_NAMES[index], NODE_ADDRS[index]
    cpu = sorted(os.sched_getaffinity(0))[index % len(os.sched_getaffinity(0))]  # the node's (Node.cmd pins to it)

    def in_child():  # the holder dies with this process
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    proc = subprocess.Popen(
        [
            "unshare",
            "--net",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            NODE_INIT,
            "node-init",
            name,
            str(root / "hosts"),
            str(root / "ssh" / "ssh_config"),
            addr,
            str(root / f"{name}.ready"),
        ],
        preexec_fn=in_child,
        stderr=subprocess.PIPE,
        text=True,
    )
    own = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "uts", "mnt")}
    deadline = time.monotonic() + 10
    while True:  # before anything is done from outside, the holder must be in namespaces of its own
        try:
            if all(os.readlink(f"/proc/{proc.pid}/ns/{ns}") != mine for ns, mine in own.items()):
                return Node(name, addr, proc.pid, cpu), proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"node {name} did not start: {proc.communicate()[1]}")
        time.sleep(0.02)


def _write_ssh(root: Path) -> None:
    """Keys and configs for key-based root login between the nodes (known hosts not kept: the test's own keys)."""
    ssh = root / "ssh"
    ssh.mkdir()
    for key in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
    shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    (ssh / "ssh_config").write_text(
        f"Host *\n    User root\n    IdentityFile {ssh / 'id_ed25519'}\n"
        "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
        "    BatchMode yes\n    LogLevel ERROR\n"
    )
    for name, addr in zip(NODE_NAMES, NODE_ADDRS, strict=True):
        (ssh / f"sshd_config.{name}").write_text(
            f"ListenAddress {addr}\nHostKey {ssh / 'host_key'}\nPidFile {root / f'sshd-{name}.pid'}\n"
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )


@contextmanager
def two_node_cluster(root: Path):
    """Two nodes with sshd and Slurm; everything is stopped on exit, also what still runs on the nodes."""
    root = Path(root)
    (root / "state").mkdir(parents=True)
    hosts = "".join(f"{addr} {name}\n" for name, addr in zip(NODE_NAMES, NODE_ADDRS, strict=True))
    (root / "hosts").write_text("127.0.0.1 localhost\n" + hosts)
    (root / "hostfile").write_text("".join(f"{n} slots=1\n" for n in NODE_NAMES))
    _write_ssh(root)
    conf = root / "slurm.conf"
    env = {"SLURM_CONF": str(conf)}
    holders = []
    with ExitStack() as stack:
        munge_socket = stack.enter_context(_munged())
        conf.write_text(_conf(root, dict(zip(NODE_NAMES, NODE_ADDRS, strict=True)), 1, munge_socket, (6817, 6818)))
        try:
            nodes = []
            for i in range(2):
                node, proc = _start_node(root, i)
                nodes.append(node)
                holders.append(proc)
            subprocess.run(
                [
                    "ip",
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    str(nodes[0].pid),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    str(nodes[1].pid),
                ],
                check=True,
            )
            deadline = time.monotonic() + 10
            while not all((root / f"{n.name}.ready").exists() for n in nodes):
                if time.monotonic() > deadline or any(p.poll() is not None for p in holders):
                    raise RuntimeError(f"nodes not set up: {[p.poll() for p in holders]}")
                time.sleep(0.02)
            for node in nodes:
                subprocess.run(
                    node.cmd(
                        shutil.which("sshd", path="/usr/sbin:/usr/bin"),
                        "-f",
                        str(root / "ssh" / f"sshd_config.{node.name}"),
                    ),
                    check=True,
                )
            daemon_env = {**os.environ, **env}
            subprocess.run(nodes[0].cmd("slurmctld", "-f", str(conf)), check=True, env=daemon_env)
            for node in nodes:
                subprocess.run(node.cmd("slurmd", "-f", str(conf), "-N", node.name), check=True, env=daemon_env)
            slurm = Slurm(root, env, tuple(nodes[0].cmd()))
            slurm.wait_idle(2, [root / "slurmctld.log"] + [root / f"slurmd-{n}.log" for n in NODE_NAMES])
            yield Cluster(root, tuple(nodes), root / "hostfile", slurm)
        finally:
            _stop(root / "slurmctld.pid", *(root / f"{d}-{n}.pid" for n in NODE_NAMES for d in ("slurmd", "sshd")))
            for node in nodes:
                for pid in node.processes():  # jobs left behind by a failed test
                    os.kill(pid, signal.SIGKILL)
            for proc in holders:
                proc.kill()
                proc.wait()
