"""The student engine a CPU user gets from ds_configs/cpu.json: torch's fused AdamW on fp32 weights under
bf16 autocast, no self-all-reduce on one rank, and the same update as a plain torch loop."""

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from pkd_fast import engine as ds
from pkd_fast.errors import PkdError

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"


def cpu_config(**overrides) -> dict:
    """ds_configs/cpu.json at a constant lr (no schedule) and without TensorBoard, resolved as a run does."""
    config = ds.read_ds_config(str(CPU_CONFIG))
    config.pop("scheduler")
    config.update(tensorboard={"enabled": False}, train_micro_batch_size_per_gpu=4, **overrides)
    return ds.resolve_ds_config(config, lr=1e-2, total_steps=10, warmup_steps=0, tensorboard_dir=Path("unused"))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.net(x).float(), y)


def test_cpu_engine_runs_fused_adamw_and_matches_a_plain_torch_step():
    """Three steps through the engine equal three steps of torch's reference (for-loop) AdamW after
    clipping to norm 1, with the forward under the same bf16 autocast."""
    ds.init_distributed()
    torch.manual_seed(0)
    model = Tiny()
    reference = copy.deepcopy(model)
    config = cpu_config()
    engine = ds.student_engine(model, config)

    assert isinstance(engine.optimizer, torch.optim.AdamW) and engine.optimizer.defaults["fused"] is True
    assert engine.enable_backward_allreduce is False  # one rank, no ZeRO: nothing to reduce
    assert next(engine.module.parameters()).dtype == torch.float32  # fp32 weights; autocast does the bf16

    params = config["optimizer"]["params"]
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=params["betas"], eps=params["eps"],
                            weight_decay=params["weight_decay"], foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = 10 * torch.randn(4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_loss = reference(x, y)
        ref_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), config["gradient_clipping"])
        opt.step()
        opt.zero_grad()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert norm > 1.0  # the clipping was exercised
    for got, want in zip(engine.module.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_zero_stages_keep_their_gradient_reduction():
    """ZeRO moves gradients into its partitions through the reduction, so it stays on even on one rank."""
    ds.init_distributed()
    engine = ds.student_engine(Tiny(), cpu_config(zero_optimization={"stage": 1}, torch_autocast={"enabled": False}))
    assert engine.enable_backward_allreduce is True


def test_autocast_config_gives_the_teacher_its_dtype(tmp_path):
    assert ds.train_dtype(ds.read_ds_config(str(CPU_CONFIG))) == torch.bfloat16
    config = json.loads(CPU_CONFIG.read_text())
    config["torch_autocast"] = {"enabled": True}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(PkdError, match="torch_autocast.dtype is required"):
        ds.read_ds_config(str(tmp_path / "c.json"))


def test_cpu_ranks_split_the_cores(monkeypatch):
    """Two ranks on this node each take half the cores, unless OMP_NUM_THREADS says otherwise."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        ds._share_cores()
        assert torch.get_num_threads() == max(1, cores // 2)
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        ds._share_cores()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# -- one run per --output-dir ------------------------------------------------------------------------

ONE_RANK = ds.Dist(0, 1, torch.device("cpu"))


def test_a_second_run_into_a_live_runs_output_dir_is_refused_naming_the_holder(capsys, tmp_path):
    """A lock held by a live process on this host (a sleeping stand-in for the first run) refuses the run in
    one line, before it writes anything, and is left in place."""
    import subprocess
    import sys

    from test_config import assert_one_line_error

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ds.OutputLock.NAME
        lock.write_text(json.dumps(ds._process_identity(holder.pid)))
        assert_one_line_error(capsys, ["--output-dir", str(tmp_path)],
                              f"--output-dir {tmp_path}: a live run (pid {holder.pid} on host ")
        assert json.loads(lock.read_text())["pid"] == holder.pid and not (tmp_path / "resolved_config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_refused(tmp_path, caplog):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ds.OutputLock.NAME
    lock.write_text(json.dumps({**ds._process_identity(os.getpid()), "pid": int(dead.stdout)}))
    with caplog.at_level("WARNING", logger="pkd_fast"):
        held = ds.OutputLock.take(tmp_path, ONE_RANK)
    [line] = [r.getMessage() for r in caplog.records]
    assert line == f"--output-dir {tmp_path}: took over the lock of pid {int(dead.stdout)} on host {socket.gethostname()}, which is no longer running"
    assert json.loads(lock.read_text())["pid"] == os.getpid() and [p.name for p in tmp_path.iterdir()] == [lock.name]
    held.release()
    assert not lock.exists()

    lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": 1}))
    with pytest.raises(PkdError, match=f"held by the run of pid 4242 on host node-7 .*if it has ended, delete {lock}$"):
        ds.OutputLock.take(tmp_path, ONE_RANK)
    assert lock.exists()
