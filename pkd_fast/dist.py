"""The process group: joining the launcher's (or making a one-process one), what a CPU rank needs on top of
DeepSpeed's own set-up (its /dev/shm segment unlinked, its share of the cores), a directory every rank must
see, and one line for a collective that lost a peer. Its own module because every stage starts here, while
DeepSpeed's JSON, the engines and the checkpoints are each a concern of their own (issue #29)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# Without a GPU DeepSpeed picks the CPU itself, but first logs "Setting accelerator to CPU. If you have GPU
# ... we were unable to detect it." on every import, the first line of every run (real_accelerator.py).
# Naming the CPU, as its own check would find it, says the same in silence; its other warnings stay.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from pkd_fast.errors import PkdError  # noqa: E402

# --dist-timeout's default, in seconds: DeepSpeed's own for the world group, now for every group (torch gives
# the groups DeepSpeed makes later 30 minutes); it outlasts any collective of a healthy run. DeepSpeed itself
# is imported inside the functions that use it, so that pkd_fast.config, which reads this default, imports no
# DeepSpeed (parsing the flags stays quick); the modules that import DeepSpeed at their top import this one
# first, for the accelerator named above.
DEFAULT_DIST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Dist:
    """Join the launcher's process group, or make a one-process group for a plain `python train.py`.

    `timeout_s` bounds the rendezvous and every collective: a peer that stops answering without closing its
    sockets (a frozen host, a dead link) ends the survivors' wait after that long. It must reach every group,
    not just the world's: DeepSpeed runs ZeRO's gradient reductions on its own clone of the world group, made
    by `new_group` without a timeout, which torch fills in from its module default (30 minutes), so that
    default is set too."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        if int(os.environ["WORLD_SIZE"]) == 1 and get_accelerator().device_name() == "cpu":
            _without_shm_all_reduce()
        deepspeed.init_distributed(verbose=False, timeout=timeout)
        _unlink_own_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _share_cores()
    return Dist(dist.get_rank(), dist.get_world_size(), device)


SHM_DIR = Path("/dev/shm")


def _without_shm_all_reduce() -> None:
    """One CPU rank has nothing to all-reduce, yet DeepSpeed 0.19's process group builds (the first time on a
    machine: ~45 s of C++ compiling) and loads its shared-memory all-reduce op for it, and maps a 66 MB
    /dev/shm segment (`shm_buffer`). `deepspeed.comm.torch.build_shm_op` returning None is DeepSpeed's own
    path for an accelerator without the op: its collectives then go through torch.distributed, which a
    one-rank group answers at once (issue #33)."""
    import importlib

    # by name: the attribute `deepspeed.comm.torch` is the torch package that deepspeed.comm imports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def shm_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce makes for `rank` of this run
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: <SHM_BUFFER_NAME>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def _unlink_own_shm_buffer() -> None:
    """DeepSpeed 0.19's CPU all-reduce gives each rank of a one-node group a 66 MB segment in RAM-backed
    /dev/shm (`shm_buffer`) and never unlinks it: every multi-rank CPU run, finished or killed, left 66 MB a
    rank behind (185 of them held 12 GB on one machine, and a later run was killed for memory). Each rank
    maps every peer's segment inside `deepspeed.init_distributed`; once a barrier shows all ranks are past
    it, each unlinks its own name. The mappings live on until the processes exit, so the all-reduce is
    unchanged, and nothing is left behind even after SIGKILL."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    if dist.get_world_size() > 1:  # (DeepSpeed makes the segments when LOCAL_SIZE == WORLD_SIZE, one rank included)
        dist.barrier()
    shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def _share_cores() -> None:
    """Give each CPU rank its share of this node's cores. The launchers start every rank with torch's
    default of one thread per core, so 2 ranks on 2 cores ran 4 threads that kept preempting each other
    in every matmul: an FT step of 2 × 32 rows on cpu.json took 6.2 s of wall time against 0.55-0.61 s with
    a core each (2-core EPYC, 2026-11-30, interleaved runs). An explicit OMP_NUM_THREADS (or the
    launcher's --bind_cores_to_rank, which sets it) wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def require_shared_directory(directory: Path, world: Dist, named: str, advice: str) -> None:
    """Refuse a directory that is not one filesystem for every rank (a node-local path given on several
    nodes), naming the ranks and hosts that cannot see rank 0's files; `named` is what the message calls it
    (e.g. the flag and its value). Rank 0 writes a file whose name is new to this call (so a file left on
    another node's disk cannot pass for it), and every rank looks for it."""
    if world.world_size == 1:
        return
    name = [f".ranks_see_this-{socket.gethostname()}-{os.getpid()}" if world.is_main else None]
    dist.broadcast_object_list(name, src=0)
    token = directory / name[0]
    if world.is_main:
        token.write_text("")
    dist.barrier()
    seen = [None] * world.world_size
    dist.all_gather_object(seen, (token.is_file(), socket.gethostname()))
    dist.barrier()
    if world.is_main:
        token.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise PkdError(f"{named}: not on a filesystem shared by all ranks ({', '.join(blind)} cannot see "
                       f"rank 0's files); {advice}")


_BACKEND_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")  # gloo's "[.../pair.cc:537] " prefix
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d+")  # gloo names a peer as "[10.0.0.2]:30352"


def lost_peer_message(err: BaseException, rank: int, timeout_s: float) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering (the backend's
    own error is a long traceback that ends in a source path), naming the peer where the backend names its
    address; None for any other error. Every node is then relaunched with --resume."""
    text = str(err).strip()
    if not (isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None
    detail = _BACKEND_SOURCE.sub("", text.splitlines()[0] if text else type(err).__name__).split(". This is typically")[0]
    peer = _PEER_ADDRESS.search(detail)
    if "timed out" in detail.lower():
        what = f"a peer sent nothing for --dist-timeout {timeout_s:g} s (a frozen process or host, or a dead link)"
    elif peer:
        what = f"lost the connection to the peer at {peer.group(1)} (its process or host is gone)"
    else:
        what = "lost a peer"
    return (f"rank {rank}: {what}; backend: {detail}. Relaunch every node with --resume: it continues from the "
            "last checkpoint")

