"""Every Triton kernel configuration the launchers can pick compiles for real GPUs (sm_80, sm_90) with
Triton's compiler and its bundled ptxas, no GPU needed: no compile error, no register spill, shared memory
within the target's per-block limit. The compiles run in subprocesses without TRITON_INTERPRET
(`benchmarks.aot_compile`, which also writes results/aot_compile.{json,md} from the same function)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.aot_compile import DTYPES, KERNELS, SHARED_LIMIT, VOCAB, compile_kernels, problems  # noqa: E402
from pkd_fast.kernels.kd_loss import kd_blocks  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return compile_kernels(jobs=os.cpu_count() or 1)


def test_every_kernel_configuration_compiles_for_sm80_and_sm90(rows):
    assert {r["kernel"] for r in rows} == {name for _, name in KERNELS}
    assert {r["target"] for r in rows} == set(SHARED_LIMIT)
    found = problems(rows)
    assert not found, f"{len(found)} of {len(rows)} configurations:\n" + "\n".join(found)


def test_the_launchers_blocks_were_compiled(rows):
    """Every vocabulary's block, read 16 bytes at a time, reached the compiler for every dtype and target:
    the grid is the launchers' choice, not a list kept here."""
    kd = {(r["target"], r["dtypes"].split()[0], r["constexprs"]["BLOCK_V"], r["num_warps"]) for r in rows if r["kernel"] == "_kd_fwd_kernel"}
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    for vocab in VOCAB:
        for dtype, size in zip(DTYPES, (4, 2, 2)):
            block = kd_blocks(vocab, 16 // size)
            for target in SHARED_LIMIT:
                assert (target, f"s={short[dtype]}", *block) in kd


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
