"""Every Triton kernel configuration the launchers can pick compiles for real GPUs (sm_80, sm_90) with
Triton's compiler and its bundled ptxas, no GPU needed: no compile error, no register spill, shared memory
within the target's per-block limit. The compiles run in subprocesses without TRITON_INTERPRET
(`benchmarks.aot_compile`, which also writes results/aot_compile.{json,md} from the same function). The
test compiles its `--quick` subset (QUICK_DTYPE), about half of the full grid the results file holds."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.aot_compile import (  # noqa: E402
    DTYPES, KERNELS, QUICK_DTYPE, QUICK_HEAD_HIDDEN, QUICK_TOPK_K, SHARED_LIMIT, VOCAB, compile_kernels, problems, repo_kernel,
)  # fmt: skip
from pkd_fast.kernels import relation_loss, topk_kd_loss  # noqa: E402
from pkd_fast.kernels.kd_loss import kd_blocks  # noqa: E402

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@pytest.fixture(scope="module")
def rows():
    return compile_kernels(jobs=os.cpu_count() or 1, quick=True)


def test_every_kernel_configuration_compiles_for_sm80_and_sm90(rows):
    assert {r["kernel"] for r in rows} == {name for _, name in KERNELS}
    assert {r["target"] for r in rows} == set(SHARED_LIMIT)
    found = problems(rows)
    assert not found, f"{len(found)} of {len(rows)} configurations:\n" + "\n".join(found)


def test_the_launchers_blocks_were_compiled(rows):
    """Every vocabulary's block, read 16 bytes at a time, reached the compiler for every dtype and target:
    the grid is the launchers' choice, not a list kept here."""
    kd = {(r["target"], r["dtypes"].split()[0], r["constexprs"]["BLOCK_V"], r["num_warps"]) for r in rows if r["kernel"] == "_kd_fwd_kernel"}
    for vocab in VOCAB:
        for dtype, size in zip(DTYPES, (4, 2, 2)):
            block = kd_blocks(vocab, 16 // size)
            for target in SHARED_LIMIT:
                assert (target, f"s={SHORT[dtype]}", *block) in kd


def test_the_new_kernels_and_variants_were_compiled(rows):
    """The KD divisors (HAS_DIVISORS), top-k KD's blocks for every vocabulary and k, and every CUDA block
    `relation_loss.launch_config` picks (for both kernels): the launchers' choice, reached on CPU tensors."""
    first_dtype = f"s={SHORT[QUICK_DTYPE]}"
    for target in SHARED_LIMIT:
        mine = [r for r in rows if r["target"] == target and r["dtypes"].split()[0] == first_dtype]
        assert any(r["kernel"] == "_kd_fwd_kernel" and r["constexprs"]["HAS_DIVISORS"] for r in mine)
        topk = {(r["constexprs"]["BLOCK_V"], r["constexprs"]["BLOCK_K"], r["num_warps"], r["constexprs"]["HAS_DIVISORS"])
                for r in mine if r["kernel"] == "_topk_kd_fwd_kernel"}  # fmt: skip
        for vocab in VOCAB:
            for k in [k for k in QUICK_TOPK_K if k < vocab] or [vocab]:
                config = topk_kd_loss.launch_config(vocab, k)
                assert {(config["BLOCK_V"], config["BLOCK_K"], config["num_warps"], d) for d in (False, True)} <= topk
        blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_DS", "BLOCK_DT")
        relation = {(r["kernel"], *(r["constexprs"].get(b) for b in blocks), r["num_warps"]) for r in mine}
        for config in relation_loss.aot_configs():  # those at equal head sizes: every block launch_config picks
            if config["BLOCK_DS"] == config["BLOCK_DT"]:
                assert (config["kernel"].__name__, *(config[b] for b in blocks), config["num_warps"]) in relation


def test_the_head_kd_blocks_were_compiled(rows):
    """The fused masked-LM head + KD (`mlm_head_kd`): every block `launch_config` picks for the student widths
    of QUICK_HEAD_HIDDEN (each padded width once), for its three kernels, each loss variant (KL, CE, both at T = 1, T ≠ 1)."""
    import torch

    launch_config = repo_kernel("mlm_head_kd").launch_config
    names = {"fwd": "_head_kd_fwd_kernel", "dh": "_head_kd_bwd_dh_kernel", "dw": "_head_kd_bwd_dw_kernel"}
    for target in SHARED_LIMIT:
        mine = [r for r in rows if r["target"] == target and r["kernel"] in names.values()]
        got = {(r["kernel"], *(r["constexprs"].get(b) for b in ("BLOCK_M", "BLOCK_V", "BLOCK_K", "BLOCK_H")), r["num_warps"],
                r["constexprs"]["HAS_KL"], r["constexprs"]["CE_OWN_STATS"]) for r in mine}  # fmt: skip
        for hidden, _ in QUICK_HEAD_HIDDEN:
            for part, config in launch_config(hidden, getattr(torch, QUICK_DTYPE)).items():
                for has_kl, ce_own in ((True, False), (False, False), (True, True)):
                    want = (names[part], *(config.get(b) for b in ("BLOCK_M", "BLOCK_V", "BLOCK_K", "BLOCK_H")), config["num_warps"],
                            has_kl, ce_own)  # fmt: skip
                    assert want in got, want


def test_problems_names_each_fault():
    clean = {"kernel": "k", "target": 80, "dtypes": "s=fp32", "constexprs": {"B": 8}, "num_warps": 4, "example": "x",
             "registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 1024, "error": None}  # fmt: skip
    assert problems([clean]) == []
    faults = [
        {**clean, "spill_stores": 4, "spill_loads": 4},
        {**clean, "target": 80, "shared": SHARED_LIMIT[80] + 1},
        {**clean, "error": "CompilationError: boom", "registers": None, "shared": None},
    ]
    found = problems(faults)
    assert len(found) == 3
    assert "spills 4 B" in found[0] and "shared memory" in found[1] and "does not compile" in found[2]


def test_an_accepted_spill_is_accepted_only_where_and_as_large_as_documented():
    """The top-k kernel's stack-frame spill (`ALLOWED_SPILLS`) passes on sm_80 at 16 warps up to 32 B, and
    nowhere else: sm_90, a larger spill, or the kernel without its KL term still fail."""
    spill = {"kernel": "_topk_kd_fwd_kernel", "target": 80, "dtypes": "s=bf16 id=i64", "num_warps": 16, "example": "x",
             "constexprs": {"HAS_KL": True, "HAS_CE": False, "BLOCK_V": 4096, "BLOCK_K": 64}, "registers": 90,
             "spill_stores": 32, "spill_loads": 28, "stack": 32, "shared": 32, "error": None}  # fmt: skip
    assert problems([spill]) == []
    for fault in (
        {**spill, "target": 90},
        {**spill, "spill_stores": 36},
        {**spill, "constexprs": {**spill["constexprs"], "HAS_KL": False}},
    ):
        assert len(problems([fault])) == 1
