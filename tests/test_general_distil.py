"""studies/general_distil.py: the corpus it distils on and the table it writes."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.general_distil import INITS, render, write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


@pytest.mark.skipif(not (GLUE_DIR / "STS-B").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_the_corpus_is_every_training_sentence_of_sst2_mrpc_and_stsb_one_per_line(tmp_path):
    counts = write_corpus(GLUE_DIR, tmp_path / "c.txt")
    lines = (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()
    assert counts == {"SST-2": 67349, "MRPC": 2 * 3668, "STS-B": 2 * 5749} and len(lines) == sum(counts.values())
    first_row = (GLUE_DIR / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1]
    assert lines[0] == first_row.split("\t")[0]  # SST-2's first sentence, as the TSV has it
    assert all(line.strip() for line in lines)


def test_the_table_gives_each_init_and_the_paired_difference():
    row = {"mean": 80.0, "std": 1.0, "seeds": [79.0, 80.0, 81.0]}
    result = {
        "teacher": "t", "student_layers": 3, "device": "cpu", "date": "2026-11-30", "corpus_sentences": 10, "mlm_seq_length": 128,
        "mlm_epochs": 1, "head_lr": 1e-3, "mlm_lr": 1e-4, "kd_positions": "masked", "point": {"alpha": 0.7}, "seeds": [1, 2, 3],
        "general": {"train_blocks": 5, "runs": {"teacher": {"dev": {"mlm_loss": 5.0, "mlm_accuracy": 20.0}},
                                                "first": {"layers": [1, 2, 3], "dev": {"mlm_loss": 6.0, "mlm_accuracy": 10.0}}}},
        "tasks": [{"task": "mrpc", "metric": "f1", "args": ["--epochs", "2"], "teacher": 85.0, "rows": {i: row for i in INITS},
                   "general-teacher": {"mean": 0.5, "ci95": [-1.0, 2.0], "p": 0.4, "n": 3}}],
    }
    text = render(result)
    assert "| mrpc (f1) | 85.00 | 80.00 ± 1.00 | 80.00 ± 1.00 | +0.50 [-1.00, +2.00], p 0.400 |" in text
    assert "| general student (layers 1,2,3) | 6.000 | 10.00 |" in text
