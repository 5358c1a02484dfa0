"""The loss microbenchmarks under pytest-benchmark: `pytest benchmarks/` (the plain `pytest` run collects
only tests/). On CUDA the issue's full grid; on the CPU the tiny shapes and few rounds, a few minutes.

Each test first checks the contender's value against the spec (a failure fails the test), then times one
mode of it through the harness's rotating inputs, synchronising so pytest-benchmark's host clock is right.
"""

import pytest

from benchmarks import harness
from benchmarks.bench_losses import MODE_FNS, MODES, check, contenders, grid, reference, skip_reason

DEVICE = harness.pick_device(None)
CASES = grid(DEVICE, quick=DEVICE.type == "cpu")
NAMES = ("fused", "eager-bf16", "eager-fp32", "compile", "liger")
ROUNDS, WARMUP_ROUNDS = (50, 5) if DEVICE.type == "cuda" else (3, 1)
# the interpreter evaluates masked-off lanes too (numpy's -inf - -inf): noise, not a result
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family}-{c.label.replace(' ', '-')}")
def test_loss(benchmark, case, name, mode):
    contender = next((c for c in contenders(case) if c.name == name), None)
    if contender is None:
        pytest.skip(f"{name} has no {case.family} version")
    reason = skip_reason(case, contender, DEVICE)
    if reason:
        pytest.skip(reason)
    sets = harness.rotating(case.draw(DEVICE), case.set_bytes, DEVICE)
    try:
        result = check(contender, sets[0], reference(case, sets[0]))
    except Exception as err:  # noqa: BLE001
        if contender.triton and harness.interpreted(DEVICE):
            pytest.skip(f"does not run under the Triton interpreter: {type(err).__name__}: {err}"[:200])
        raise
    if contender.spec:
        assert result["ok"], f"{name} differs from the spec: {result}"
    call = harness.cycling(MODE_FNS[mode](contender.fn), sets)

    def synced():
        out = call()
        harness.synchronize(DEVICE)
        return out

    benchmark.group = f"{case.family} {case.label} {mode}"
    benchmark.extra_info.update(check=result, min_bytes=case.min_bytes(mode), interpreter=contender.triton and harness.interpreted(DEVICE))
    benchmark.pedantic(synced, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
