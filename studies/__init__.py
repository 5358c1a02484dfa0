"""Research studies run with pkd_fast: what distillation choices measure on a GLUE task (see studies/README.md).

The scripts share the benchmarks' harness (device description, results writing) and import `benchmarks`
first, so its environment set-up (Triton's CPU interpreter when there is no GPU, the offline hub) comes
before triton or transformers is imported, as it did when these scripts lived in benchmarks/.
"""

import benchmarks  # noqa: F401  (sets TRITON_INTERPRET, HF_HUB_OFFLINE, TOKENIZERS_PARALLELISM)
