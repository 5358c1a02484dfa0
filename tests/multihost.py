"""Two "hosts" on one machine, for the multi-node tests: two network namespaces joined by a veth pair with
private addresses, each running DeepSpeed's own launcher exactly as a user runs it on two machines
(`deepspeed --no_ssh --node_rank N --hostfile H --master_addr <host 1> ...`).

Traffic only ever goes between the two namespaces this module creates (a private /30 on its own veth
pair). Names carry the test process's pid, so concurrent runs do not collide, and `TwoHosts.close` kills
every launched process group and deletes both namespaces (which removes the veth pair with them).

A host may also get its own "disk": a directory bind-mounted over a common path inside that host's mount
namespace only (`ip netns exec` gives each command a private mount namespace), so the same path names a
different directory on each host, like a node-local /scratch on two machines.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "pkd_fast" / "train.py"
SUBNET = "10.213.0.{}/30"  # private; lives only inside the two namespaces
_ports = itertools.count(29600)  # a fresh namespace has no listeners: any port is free there
_instances = itertools.count()  # with the pid, makes every pair's names unique


class HarnessError(RuntimeError):
    """The two hosts could not be made (no root, no iproute2, no veth support)."""


@dataclass
class Host:
    node_rank: int
    netns: str
    ifname: str
    addr: str
    disk: Path | None = None  # bind-mounted over TwoHosts.local_path on this host only


@dataclass
class Launch:
    host: Host
    proc: subprocess.Popen
    log: Path
    started: float

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; raises subprocess.TimeoutExpired past `timeout` seconds."""
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Send `sig` to the launcher and every rank it started (they share its process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HarnessError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")


class TwoHosts:
    """Host 1 (node rank 0, the master) and host 2 (node rank 1), `ranks_per_host` CPU ranks each."""

    def __init__(self, workdir: Path, *, ranks_per_host: int = 1, local_path: Path | None = None,
                 disks: tuple[Path, Path] | None = None):
        tag = f"{os.getpid()}-{next(_instances)}"
        self.workdir = workdir
        self.local_path = local_path
        self.hosts = [
            Host(i, f"pkd{i + 1}n{tag}", f"pkd{i + 1}v{tag}"[:15], SUBNET.format(i + 1).split("/")[0],
                 disks[i] if disks else None)
            for i in range(2)
        ]
        self.hostfile = workdir / "hostfile"
        self.hostfile.write_text("".join(f"{h.addr} slots={ranks_per_host}\n" for h in self.hosts))
        self.launches: list[Launch] = []
        self._made: list[str] = []

    # -- namespaces -----------------------------------------------------------------------------------
    def open(self) -> "TwoHosts":
        if os.geteuid() != 0:
            raise HarnessError("the multi-node tests make network namespaces and need root (CI runs as root)")
        try:
            a, b = self.hosts
            for h in self.hosts:
                _ip("netns", "add", h.netns)
                self._made.append(h.netns)
            _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
            for h in self.hosts:
                _ip("link", "set", h.ifname, "netns", h.netns)
                _ip("-n", h.netns, "addr", "add", SUBNET.format(h.node_rank + 1), "dev", h.ifname)
                _ip("-n", h.netns, "link", "set", h.ifname, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
        except (HarnessError, OSError, subprocess.TimeoutExpired) as err:
            self.close()
            raise HarnessError(f"cannot make two hosts from network namespaces: {err}") from None
        return self

    def close(self) -> None:
        """Kill every launched process group (SIGKILL also ends stopped ones), then delete the namespaces."""
        for launch in self.launches:
            launch.signal(signal.SIGCONT)
            launch.signal(signal.SIGKILL)
            try:
                launch.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for netns in self._made:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> "TwoHosts":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- launching ------------------------------------------------------------------------------------
    @property
    def master(self) -> Host:
        return self.hosts[0]

    def launch(self, node_rank: int, args: list[str], *, master_port: int, log_name: str = "") -> Launch:
        """DeepSpeed's launcher on one host, as a user types it on that machine."""
        host = self.hosts[node_rank]
        cmd = ["deepspeed", "--no_ssh", "--node_rank", str(node_rank), "--hostfile", str(self.hostfile),
               "--master_addr", self.master.addr, "--master_port", str(master_port), str(TRAIN), *args]
        if host.disk is not None:  # this host's own directory at the common path, seen by nobody else
            cmd = ["sh", "-c", f'mount --bind {shlex.quote(str(host.disk))} {shlex.quote(str(self.local_path))} && exec "$@"',
                   "sh", *cmd]
        # gloo binds and connects through this interface; without it, it resolves the hostname to 127.0.0.1
        run_env = {**os.environ, "GLOO_SOCKET_IFNAME": host.ifname}
        run_env["PATH"] = f"{Path(sys.executable).parent}:{run_env.get('PATH', '')}"  # `deepspeed` bound to this venv
        log = self.workdir / f"{log_name or 'run'}-host{node_rank + 1}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env=run_env, cwd=REPO, start_new_session=True)
        launch = Launch(host, proc, log, time.monotonic())
        self.launches.append(launch)
        return launch

    def run_both(self, args: list[str], *, timeout: float = 300, log_name: str = "") -> tuple[Launch, Launch]:
        """Launch on both hosts and wait for both to exit; past `timeout` both are killed and the test fails."""
        launches = self.start_both(args, log_name=log_name)
        deadline = time.monotonic() + timeout
        for launch in launches:
            try:
                launch.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in launches:
                    other.signal(signal.SIGKILL)
                raise AssertionError(f"the two hosts did not finish in {timeout:.0f} s\n" + describe(launches)) from None
        return launches

    def start_both(self, args: list[str], *, log_name: str = "") -> tuple[Launch, Launch]:
        """The same command on both hosts (host 1 first), one fresh master port; returns without waiting."""
        port = next(_ports)
        return tuple(self.launch(i, args, master_port=port, log_name=log_name) for i in range(2))


def describe(launches) -> str:
    """Each host's exit status and the tail of its output, for assertion messages."""
    return "\n".join(f"--- host {l.host.node_rank + 1} (exit {l.proc.returncode}):\n{l.output()[-4000:]}" for l in launches)


def wait_for(predicate, timeout: float, what: str, launches=()) -> None:
    """Poll `predicate` every 0.2 s; fail naming `what` (and the hosts' output) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or any(l.proc.poll() is not None for l in launches):
            raise AssertionError(f"{what}: not seen within {timeout:.0f} s\n" + describe(launches))
        time.sleep(0.2)
