"""Patient Knowledge Distillation of a BERT teacher into a shallower student, on DeepSpeed.

    deepspeed pkd_fast/train.py --deepspeed ds_configs/zero2.json [flags]      (or plain `python`)

parse the flags → pick the objective's recipe (`pkd_fast/recipes/`: glue or mlm) → run it. Every recipe
trains through the one loop in `pkd_fast/trainer.py`.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from pkd_fast import engine as ds
from pkd_fast.config import Config, parse_config
from pkd_fast.errors import PkdError
from pkd_fast.trainer import Stopped
from pkd_fast.recipes import common, glue, mlm
from pkd_fast.recipes.glue import Context, Run  # noqa: F401  (the GLUE recipe's pieces, used by benchmarks and tests)

RECIPES = {"glue": glue.run, "mlm": mlm.run}


def main(argv: list[str] | None = None) -> dict:
    cfg = None
    try:
        cfg = parse_config(argv)
        return run(cfg)
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:  # a collective failed: say which peer was lost, not a traceback
        lost = ds.lost_peer_message(err, dist.get_rank(), cfg.dist_timeout) if cfg and dist.is_initialized() else None
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        raise SystemExit(1) from None
    except Stopped as stop:  # SIGTERM/SIGINT: saved where every rank agreed; a requested end, not a failure
        if dist.get_rank() == 0:
            print(stop, file=sys.stderr)
        raise SystemExit(0) from None
    finally:
        common.end()


def run(cfg: Config) -> dict:
    return RECIPES[cfg.objective](cfg)


if __name__ == "__main__":
    main()
