"""The one command: loss microbenchmarks, end-to-end training step, report, into
benchmarks/results/<device>.json, .md and .png (<device>: "cpu", or the GPU's name, e.g.
"nvidia-h100-80gb-hbm3"). On CUDA the issue's full grid; on the CPU a cut-down grid that finishes in minutes.

    python -m benchmarks.run_all [--device cuda|cpu] [--quick] [--threads N] [--only losses|step]

On the lent GPU machine, which lacks deepspeed and datasets (pkd_fast.data imports it): build the wheels
here once, from the project root,
    bash ../shared/tools/gpu-wheels.sh liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
then run with carry [".whl"] (results come back through $OUT; copy them into benchmarks/results/):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && python3 -m benchmarks.run_all; cp benchmarks/results/nvidia-* $OUT/
A device command may run 10 minutes at most: the full grid is sized to fit; if it does not, run
`--only losses` and then `--only step` (each part merges into the same results file, which travels
with the working tree), or `--quick`.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks import bench_losses, bench_step, harness, report

PARTS = ("losses", "step")


def main(argv=None) -> None:
    p = harness.parser(__doc__, quick="a few shapes and micro-batches, shorter timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier timings on a shared CPU)")
    p.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable); the report always")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.pick_device(args.device)
    path = harness.results_path(device)
    parts = args.only or PARTS
    t0 = time.time()
    if "losses" in parts:
        bench_losses.run(device, args.quick, path=path)
    if "step" in parts:
        bench_step.run(device, args.quick, path=path)
    harness.update_results(path, device, run={"command": " ".join(["python -m benchmarks.run_all", *(argv if argv is not None else sys.argv[1:])]),
                                               "parts": list(parts), "quick": args.quick, "seconds": round(time.time() - t0)})  # fmt: skip
    md, png = report.render(path)
    print(f"wrote {path}, {md}, {png} in {time.time() - t0:.0f} s")
    bad = bench_losses.failed_checks(json.loads(path.read_text()))
    if bad:
        raise SystemExit("value check failed:\n" + "\n".join(bad))


if __name__ == "__main__":
    main()
