"""One recipe per objective, one file each, registering its objective with `pkd_fast.config.register`
(`pkd_fast.train.load_recipes` imports every file here): `glue` (task distillation: teacher fine-tune →
teacher cache → FT/KD/PKD students → table) and `mlm` (raw text: teacher MLM-head fit → general
distillation → a masked-LM student). Both train through `pkd_fast.trainer.Trainer` and learn from a
`pkd_fast.teacher.TeacherSource`; `common` holds what they share (setup, the run key, the trainer's
settings, the finished-run check, evaluation batches, the results files and table)."""
