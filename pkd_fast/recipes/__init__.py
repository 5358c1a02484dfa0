"""One recipe per objective, each a `run(cfg) -> dict`: `glue` (task distillation: teacher fine-tune →
teacher cache → FT/KD/PKD students → table) and `mlm` (raw text: teacher MLM-head fit → general
distillation → a masked-LM student). Both train through `pkd_fast.trainer.Trainer`; `common` holds
what they share (setup, the run key, the trainer's settings)."""
