"""Patient Knowledge Distillation of a BERT teacher into a shallower student, on DeepSpeed.

    deepspeed pkd_fast/train.py --deepspeed ds_configs/zero2.json [flags]      (or plain `python`)

load the recipes (each file of `pkd_fast/recipes/` registers its objective) → parse the flags → run the
recipe --objective names. Every recipe trains through the one loop in `pkd_fast/trainer.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import torch.distributed as dist

from pkd_fast import recipes
from pkd_fast.config import Config, parse_config
from pkd_fast.dist import lost_peer_message
from pkd_fast.errors import PkdError
from pkd_fast.recipes import common
from pkd_fast.trainer import Stopped


def load_recipes() -> None:
    """Import every module of `pkd_fast/recipes/`: each recipe registers its objective (`config.register`),
    so a new objective is one new file there."""
    for module in pkgutil.iter_modules(recipes.__path__):
        importlib.import_module(f"{recipes.__name__}.{module.name}")


load_recipes()


def main(argv: list[str] | None = None) -> dict:
    cfg = None
    try:
        cfg = parse_config(argv)
        return run(cfg)
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:  # a collective failed: say which peer was lost, not a traceback
        lost = lost_peer_message(err, dist.get_rank(), cfg.dist_timeout) if cfg and dist.is_initialized() else None
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
    return cfg.recipe.run(cfg)


if __name__ == "__main__":
    main()
