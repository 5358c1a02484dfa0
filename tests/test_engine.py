"""The student engine a CPU user gets from ds_configs/cpu.json: torch's fused AdamW on fp32 weights under
bf16 autocast, no self-all-reduce on one rank, and the same update as a plain torch loop."""

import copy
import errno
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from pkd_fast import checkpoints, deepspeed_json
from pkd_fast.dist import SHM_DIR, Dist, _free_port, _share_cores, init_distributed
from pkd_fast.engines import TEACHER_ROWS_PER_FORWARD, student_engine, teacher_forward
from pkd_fast.errors import PkdError
from pkd_fast.output_lock import OutputLock, _process_identity

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"


def cpu_config(**overrides) -> dict:
    """ds_configs/cpu.json at a constant lr (no schedule) and without TensorBoard, resolved as a run does."""
    config = deepspeed_json.read_ds_config(str(CPU_CONFIG))
    config.pop("scheduler")
    config.update(tensorboard={"enabled": False}, train_micro_batch_size_per_gpu=4, **overrides)
    return deepspeed_json.resolve_ds_config(config, lr=1e-2, total_steps=10, warmup_steps=0, tensorboard_dir=Path("unused"))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.net(x).float(), y)


def test_cpu_engine_runs_fused_adamw_and_matches_a_plain_torch_step():
    """Three steps through the engine equal three steps of torch's reference (for-loop) AdamW after
    clipping to norm 1, with the forward under the same bf16 autocast."""
    init_distributed()
    torch.manual_seed(0)
    model = Tiny()
    reference = copy.deepcopy(model)
    config = cpu_config()
    engine = student_engine(model, config)

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
    init_distributed()
    engine = student_engine(Tiny(), cpu_config(zero_optimization={"stage": 1}, torch_autocast={"enabled": False}))
    assert engine.enable_backward_allreduce is True


def zero2_config(**overrides) -> dict:
    """ds_configs/zero2.json at a constant lr without TensorBoard, resolved as a run does."""
    config = deepspeed_json.read_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    config.pop("scheduler")
    config.update(tensorboard={"enabled": False}, train_micro_batch_size_per_gpu=4, **overrides)
    return deepspeed_json.resolve_ds_config(config, lr=1e-2, total_steps=10, warmup_steps=0, tensorboard_dir=Path("unused"))


ONE_CPU_RANK = Dist(0, 1, torch.device("cpu"))


def test_one_cpu_rank_runs_fp32_zero2_at_stage_0_with_fused_adamw(caplog):
    """On one CPU rank ZeRO-2 partitions nothing: an fp32 run (zero2.json as an AVX2 CPU runs it) goes to
    stage 0, bf16 weights keep ZeRO-2 (stage 0 would wrap them in DeepSpeed's FP16_UnfusedOptimizer), both
    with torch's fused AdamW, said in one line; the JSON's optimizer, scheduler, clipping and precision stay.
    Several ranks, a GPU, ZeRO-3, offload and an AdamW the JSON configures itself keep the JSON as written."""
    bf16 = deepspeed_json.read_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    fp32 = {**bf16, "bf16": {"enabled": False}}
    for config, stage in ((fp32, 0), (bf16, 2)):
        caplog.clear()
        with caplog.at_level("INFO", logger="pkd_fast"):
            runs = deepspeed_json.one_cpu_rank_config(config, ONE_CPU_RANK)
        assert runs["zero_optimization"] == ({"stage": 0} if stage == 0 else config["zero_optimization"])
        assert runs["optimizer"]["params"] == {**config["optimizer"]["params"], "fused": True}
        assert {k: v for k, v in runs.items() if k not in ("zero_optimization", "optimizer")} == {
            k: v for k, v in config.items() if k not in ("zero_optimization", "optimizer")}
        assert config["zero_optimization"]["stage"] == 2 and "fused" not in config["optimizer"]["params"]  # a copy
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("one CPU rank")]
        assert len(lines) == 1 and ("ZeRO stage 2 → 0" in lines[0]) == (stage == 0) and "fused" in lines[0]
    as_written = [
        (fp32, Dist(0, 2, torch.device("cpu"))),
        (fp32, Dist(0, 1, torch.device("cuda", 0))),
        ({**fp32, "zero_optimization": {"stage": 3}}, ONE_CPU_RANK),
        ({**fp32, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, ONE_CPU_RANK),
        ({**fp32, "zero_optimization": {"stage": 0}, "optimizer": {**fp32["optimizer"], "params": {
            **fp32["optimizer"]["params"], "fused": False}}}, ONE_CPU_RANK),
    ]
    for config, world in as_written:
        assert deepspeed_json.one_cpu_rank_config(config, world) == config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_cpu_rank_trains_as_the_json_as_written(precision):
    """Three steps of what one CPU rank runs for zero2.json (fp32: stage 0, fused AdamW; bf16: ZeRO-2, fused
    AdamW) equal those of the JSON as written on the same model and data, losses and weights, up to round-off
    (bf16: one step of its weights' resolution), clipping included."""
    init_distributed()
    as_written = zero2_config(bf16={"enabled": precision == "bf16"})
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Tiny()
    engines = [student_engine(copy.deepcopy(model), c) for c in (as_written, deepspeed_json.one_cpu_rank_config(as_written, ONE_CPU_RANK))]
    assert type(engines[0].optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert engines[1].basic_optimizer.defaults["fused"] is True
    assert (engines[1].optimizer is engines[1].basic_optimizer) == (precision == "fp32")  # stage 0: no ZeRO wrapper
    gen = torch.Generator().manual_seed(1)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 0, "atol": 4e-3}
    for _ in range(3):
        x, y = 10 * torch.randn(4, 8, generator=gen).to(dtype), torch.randint(0, 3, (4,), generator=gen)
        losses = []
        for engine in engines:
            losses.append(engine(x, y))
            engine.backward(losses[-1])
            engine.step()
        torch.testing.assert_close(losses[1], losses[0], **tolerance)
    moved = [(after - before.to(dtype)).abs().max() for after, before in zip(engines[0].module.parameters(), model.parameters())]
    assert min(moved) > 1e-2  # three updates of lr 1e-2: the weights compared below were trained
    for got, want in zip(engines[1].module.parameters(), engines[0].module.parameters()):
        torch.testing.assert_close(got, want, **tolerance)

def test_autocast_config_gives_the_teacher_its_dtype(tmp_path):
    assert deepspeed_json.train_dtype(deepspeed_json.read_ds_config(str(CPU_CONFIG))) == torch.bfloat16
    config = json.loads(CPU_CONFIG.read_text())
    config["torch_autocast"] = {"enabled": True}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(PkdError, match="torch_autocast.dtype is required"):
        deepspeed_json.read_ds_config(str(tmp_path / "c.json"))


def test_cpu_ranks_split_the_cores(monkeypatch):
    """Two ranks on this node each take half the cores, unless OMP_NUM_THREADS says otherwise."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        _share_cores()
        assert torch.get_num_threads() == max(1, cores // 2)
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        _share_cores()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# -- checkpoints: damage, another run, a full disk ------------------------------------------------------

KEY = {"objective": "glue", "student_layers": 2, "deepspeed_json": {"zero_optimization": {"stage": 0}}}


def saved_steps(tmp_path, steps=(1, 2), keep=2):
    """A checkpoint directory holding `steps` of a Tiny engine trained one step between saves."""
    init_distributed()
    engine = student_engine(Tiny(), cpu_config())
    directory = tmp_path / "checkpoints"
    for step in steps:
        engine.backward(engine(torch.randn(4, 8), torch.tensor([0, 1, 2, 0])))
        engine.step()
        checkpoints.save_checkpoint(engine, directory, step, 0, KEY, keep=keep)
    return engine, directory


def damage_model_states(directory, how):
    states = directory / "step2" / "mp_rank_00_model_states.pt"
    if how == "deleted":
        states.unlink()
    elif how == "truncated":
        states.write_bytes(states.read_bytes()[:100])
    elif how == "latest not UTF-8":
        (directory / "latest").write_bytes(b"step\xff\xfe2")
    elif how == "latest names no checkpoint":
        (directory / "latest").write_text("step99")
    elif how == "rng state deleted":
        (directory / "step2" / "rng_rank0.pt").unlink()
    elif how == "manifest cut short":
        manifest = directory / "step2" / checkpoints.MANIFEST
        manifest.write_bytes(manifest.read_bytes()[:20])


# how → the step --resume continues from when step1 and step2 are kept: `latest` damaged, step2 is still intact
DAMAGE = {"deleted": 1, "truncated": 1, "rng state deleted": 1, "manifest cut short": 1, "latest not UTF-8": 2,
          "latest names no checkpoint": 2}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, how):
    """--resume finds the damage by the manifest (no file is loaded to find it) and says so in one line."""
    engine, directory = saved_steps(tmp_path)
    damage_model_states(directory, how)
    with caplog.at_level("WARNING", logger="pkd_fast"):
        step, _ = checkpoints.load_checkpoint(engine, directory, 0, KEY)
    assert step == DAMAGE[how]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "pkd_fast"]
    assert warning.startswith(f"--resume {directory}: ") and "\n" not in warning
    assert warning.endswith(f"resuming from step{DAMAGE[how]}, the newest intact checkpoint")


def test_a_step_saved_again_over_a_killed_saves_leftover_is_intact(tmp_path, caplog):
    """A kill after a save's files and manifest were written but before `latest` named them leaves that
    step's folder; the resumed run saves the same step into it again. Its new manifest once listed the old
    manifest.json with the old size, so --resume took this checkpoint for damaged and fell back."""
    engine, directory = saved_steps(tmp_path, steps=(1, 2), keep=2)
    (directory / "step2" / checkpoints.MANIFEST).write_text('{"step": 2, "run_key": {}, "files": {"a file of a longer list": 1}}')
    checkpoints.save_checkpoint(engine, directory, 2, 0, KEY, keep=2)
    with caplog.at_level("WARNING", logger="pkd_fast"):
        step, _ = checkpoints.load_checkpoint(engine, directory, 0, KEY)
    assert step == 2 and not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "pkd_fast"]


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_damaged_checkpoint_with_nothing_to_fall_back_to_is_one_line(tmp_path, how):
    engine, directory = saved_steps(tmp_path, steps=(2,), keep=1)
    damage_model_states(directory, how)
    with pytest.raises(PkdError) as err:
        checkpoints.load_checkpoint(engine, directory, 0, KEY)
    message = str(err.value)
    assert message.startswith(f"--resume {directory}: step2/mp_rank_00_model_states.pt is ")
    assert "no intact checkpoint to fall back to" in message and "\n" not in message


def test_resume_without_a_checkpoint_says_it_starts_at_step_0(tmp_path, caplog):
    init_distributed()
    engine = student_engine(Tiny(), cpu_config())
    with caplog.at_level("WARNING", logger="pkd_fast"):
        assert checkpoints.load_checkpoint(engine, tmp_path / "none", 0, KEY) == (0, {})
    assert f"--resume: no checkpoint under {tmp_path / 'none'}: starting at step 0" in caplog.text


@pytest.mark.parametrize("change, named", [
    ({"student_layers": 3}, "student_layers: checkpoint 2 ≠ now 3"),
    ({"objective": "mlm"}, "objective: checkpoint 'glue' ≠ now 'mlm'"),
    ({"deepspeed_json": {"zero_optimization": {"stage": 1}}}, "deepspeed_json.zero_optimization.stage: checkpoint 0 ≠ now 1"),
], ids=["depth", "objective", "zero_stage"])
def test_another_runs_checkpoint_is_refused_before_deepspeed_loads_it(tmp_path, change, named):
    """The run key is compared first: a student of another shape (another depth, objective or ZeRO stage)
    made DeepSpeed's load fail with a traceback before the comparison could name what differs."""
    _, directory = saved_steps(tmp_path, steps=(1,))
    other = student_engine(torch.nn.Sequential(torch.nn.Linear(8, 5)), cpu_config())  # another shape
    with pytest.raises(PkdError) as err:
        checkpoints.load_checkpoint(other, directory, 0, {**KEY, **change})
    assert str(err.value).startswith(f"--resume {directory}: the checkpoint is of another run ({named}); ")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240"),  # torch.save's short write
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
], ids=["short_write", "ENOSPC"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, failure):
    """The step's half-written files are removed and `latest` still names the last complete checkpoint."""
    engine, directory = saved_steps(tmp_path, steps=(1,))
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)):  # DeepSpeed's files: part of one lands on disk, then the write fails
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(PkdError) as err:
        checkpoints.save_checkpoint(engine, directory, 2, 0, KEY, keep=2)
    message = str(err.value)
    assert message.startswith(f"{directory / 'step2'}: cannot write (") and " MiB free on its filesystem" in message
    assert message.endswith("the checkpoint step2 was not saved (an earlier one, if any, is kept)") and "\n" not in message
    assert (directory / "latest").read_text() == "step1" and not (directory / "step2").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoints.load_checkpoint(engine, directory, 0, KEY)[0] == 1


def test_a_fresh_run_drops_the_checkpoints_an_earlier_run_left(tmp_path):
    """Without --resume, an earlier run's step12 would outrank this run's step2 when pruning by step number
    (removing the checkpoint just published); the run starts by removing it."""
    from pkd_fast.losses import LossTerms
    from pkd_fast.distill import DistillOutput
    from pkd_fast.trainer import Trainer

    world = init_distributed()
    stale = tmp_path / "checkpoints" / "step12"
    stale.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step12")
    trainer = Trainer(world, cpu_config(), log_steps=100, save_steps=1, warmup_ratio=0.0, resume=False, on_nonfinite="stop")
    class Batches(list):  # a map-style loader of two micro-batches: one epoch of two steps
        def set_epoch(self, epoch):
            pass

    rows = Batches({"x": torch.randn(4, 8), "y": torch.tensor([0, 1, 2, 0]), "attention_mask": torch.ones(4, 2)} for _ in range(2))

    def step(engine, batch, terms, divisors):
        loss = engine(batch["x"], batch["y"])
        return DistillOutput(LossTerms(loss), {"student output": loss})

    trainer.fit(Tiny(), rows, step, name="tiny", out=tmp_path, lr=1e-2, epochs=1, run_key=KEY, evaluate=lambda e: {"x": 0.0},
                watch=["student output"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step2"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step2"


# -- one run per --output-dir ------------------------------------------------------------------------

ONE_RANK = Dist(0, 1, torch.device("cpu"))


def test_a_second_run_into_a_live_runs_output_dir_is_refused_naming_the_holder(capsys, tmp_path):
    """A lock held by a live process on this host (a sleeping stand-in for the first run) refuses the run in
    one line, before it writes anything, and is left in place."""
    import subprocess
    import sys

    from test_config import assert_one_line_error

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / OutputLock.NAME
        lock.write_text(json.dumps(_process_identity(holder.pid)))
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
    lock = tmp_path / OutputLock.NAME
    lock.write_text(json.dumps({**_process_identity(os.getpid()), "pid": int(dead.stdout)}))
    with caplog.at_level("WARNING", logger="pkd_fast"):
        held = OutputLock.take(tmp_path, ONE_RANK)
    [line] = [r.getMessage() for r in caplog.records]
    assert line == f"--output-dir {tmp_path}: took over the lock of pid {int(dead.stdout)} on host {socket.gethostname()}, which is no longer running"
    assert json.loads(lock.read_text())["pid"] == os.getpid() and [p.name for p in tmp_path.iterdir()] == [lock.name]
    held.release()
    assert not lock.exists()

    lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": 1}))
    with pytest.raises(PkdError, match=f"held by the run of pid 4242 on host node-7 .*if it has ended, delete {lock}$"):
        OutputLock.take(tmp_path, ONE_RANK)
    assert lock.exists()


def test_the_teacher_runs_a_cpu_batch_by_length_with_the_outputs_of_one_forward():
    """`teacher_forward` runs a padded batch's rows sorted by length, TEACHER_ROWS_PER_FORWARD at a time,
    each cut to its longest row: logits and every layer's states at the real tokens equal one forward of
    the whole batch up to round-off, in the batch's row order."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=48, num_labels=2, attn_implementation="sdpa")
    teacher = BertForSequenceClassification(config).eval()
    rows, width = 2 * TEACHER_ROWS_PER_FORWARD + 3, 40  # three forwards, the last of 3 rows
    lengths = torch.randint(2, width + 1, (rows,), generator=torch.Generator().manual_seed(1))
    lengths[5] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    inputs = {"input_ids": torch.randint(1, 64, (rows, width)) * mask, "attention_mask": mask,
              "token_type_ids": torch.zeros(rows, width, dtype=torch.long)}
    forwards = []
    counting = teacher.register_forward_hook(lambda module, args, output: forwards.append(1))
    with torch.no_grad():
        whole = teacher(**inputs, output_hidden_states=True)
        by_length = teacher_forward(teacher, inputs, output_hidden_states=True)
        logits_only = teacher_forward(teacher, inputs)
    counting.remove()
    assert len(forwards) == 1 + 2 * 3
    torch.testing.assert_close(by_length.logits, whole.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_only.logits, whole.logits, rtol=1e-5, atol=1e-6)
    assert logits_only.hidden_states is None and len(by_length.hidden_states) == len(whole.hidden_states) == 3
    left_padded = {name: value.flip(1) for name, value in inputs.items()}
    forwards.clear()
    counting = teacher.register_forward_hook(lambda module, args, output: forwards.append(1))
    with torch.no_grad():
        teacher_forward(teacher, left_padded)
    counting.remove()
    assert len(forwards) == 1  # no cut through a left-padded row's tokens
    real = mask.bool()
    for got, want in zip(by_length.hidden_states, whole.hidden_states):
        assert got.shape == want.shape
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_the_teacher_by_length_gives_every_familys_outputs():
    """Each supported family's classifier (tiny, random) gives the same logits and real-token states by
    length as in one forward: no family reads the right padding that the cut removes."""
    from tiny_families import SHAPES, char_tokenizer, tiny_config
    from transformers import AutoModelForSequenceClassification

    tokenizer = char_tokenizer()
    rows, width = 2 * TEACHER_ROWS_PER_FORWARD + 3, 24
    lengths = torch.randint(2, width + 1, (rows,), generator=torch.Generator().manual_seed(1))
    lengths[3] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    inputs = {"input_ids": torch.randint(5, 30, (rows, width)) * mask + (1 - mask) * tokenizer.pad_token_id, "attention_mask": mask}
    for model_type in SHAPES:
        torch.manual_seed(0)
        teacher = AutoModelForSequenceClassification.from_config(tiny_config(model_type, tokenizer, num_labels=2)).eval()
        with torch.no_grad():
            whole = teacher(**inputs, output_hidden_states=True)
            by_length = teacher_forward(teacher, inputs, output_hidden_states=True)
        torch.testing.assert_close(by_length.logits, whole.logits, rtol=1e-5, atol=1e-5, msg=model_type)
        for got, want in zip(by_length.hidden_states, whole.hidden_states, strict=True):
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5, msg=model_type)


SHM_PROBE = """
import torch, deepspeed.comm as dscomm
from pkd_fast.dist import init_distributed, shm_buffer
world = init_distributed()
torch.distributed.barrier()  # every rank is past its own unlink
left = [str(p) for p in (shm_buffer(r) for r in range(world.world_size)) if p.exists()]
t = torch.full((1024,), float(world.rank + 1))
dscomm.inference_all_reduce(t)  # DeepSpeed's shared-memory all-reduce, through the mappings made at init
print(f"rank {world.rank}: left {left}, sum {t[0].item()}, {t[-1].item()}", flush=True)
"""


@pytest.mark.slow
def test_two_cpu_ranks_leave_no_shared_memory_segment_and_still_all_reduce(tmp_path):
    """DeepSpeed's CPU all-reduce segments (66 MB a rank in /dev/shm) are unlinked once every rank has mapped
    them: gone while the run still runs, its shared-memory all-reduce still right, none left after it."""
    import subprocess
    import sys

    port = str(_free_port())
    script = tmp_path / "probe.py"
    script.write_text(SHM_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", port, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: left [], sum 3.0, 3.0" in proc.stdout, proc.stdout[-2000:]
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


ONE_RANK_PROBE = """
import importlib, torch
ds_torch = importlib.import_module("deepspeed.comm.torch")
built = []
real = ds_torch.build_shm_op
ds_torch.build_shm_op = lambda: built.append(1) or real()  # replaced again by init_distributed on one CPU rank
from pkd_fast.dist import init_distributed, shm_buffer
world = init_distributed()
t = torch.full((8,), 2.0)
torch.distributed.all_reduce(t)
print(f"world {world.world_size}: built {len(built)}, segment {shm_buffer(0).exists()}, sum {t[0].item()}", flush=True)
"""


def test_one_cpu_rank_builds_no_shared_memory_all_reduce(tmp_path):
    """A one-rank CPU run has nothing to all-reduce: DeepSpeed's shared-memory op is neither compiled (~45 s on
    a fresh machine) nor loaded, no /dev/shm segment is made, and collectives still answer (issue #33)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(ONE_RANK_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world 1: built 0, segment False, sum 2.0" in proc.stdout, proc.stdout[-2000:]
    assert "built successfully" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("now, reused", [
    ({"relation_weight": 0.0, "group_by_length": False}, True),  # what runs before these flags did
    ({"relation_weight": 0.0, "group_by_length": None}, True),  # mlm: no grouping flag
    ({"relation_weight": 1.0, "group_by_length": False}, False),  # a new term the stored run never had
    ({"relation_weight": 0.0, "group_by_length": True}, False),  # grouped batches: not the stored run's
])
def test_a_run_from_before_a_flag_existed_matches_only_the_flags_old_behaviour(now, reused):
    """A finished run or checkpoint written before a flag existed lacks it in its key: --resume keeps it when
    the flag's value does what runs did then (config.ADDED_FLAGS), and refuses any other value by name."""
    from pkd_fast.config import ADDED_FLAGS

    stored = {"lr": 1e-4, "deepspeed_json": {"zero_optimization": {"stage": 2}}}
    check = lambda: checkpoints.require_same_run(stored, {**stored, **now}, "finished", "--resume out: other settings", "advice", ADDED_FLAGS)  # noqa: E731
    if reused:
        check()
    else:
        with pytest.raises(PkdError, match="finished '\\(none\\)' ≠ now"):
            check()
    with pytest.raises(PkdError, match="lr: finished 0.0001 ≠ now 0.001"):  # an old flag's change is still refused
        checkpoints.require_same_run(stored, {**stored, **now, "lr": 1e-3}, "finished", "--resume out: other settings", "advice", ADDED_FLAGS)
