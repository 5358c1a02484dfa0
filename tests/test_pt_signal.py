"""The patient-term diagnostic: a student identical to its teacher feels no patient loss, and β only scales."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.pt_signal import main  # noqa: E402
from pkd_fast.config import default_teacher  # noqa: E402

GLUE_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


@pytest.mark.skipif(not (GLUE_DIR / "MRPC").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
@pytest.mark.parametrize("student_layers, zero", [(6, True), (3, False)])
def test_pt_signal(tmp_path, student_layers, zero):
    result = main(["--task", "mrpc", "--teacher", default_teacher(), "--glue-dir", str(GLUE_DIR), "--strategy", "last",
                   "--student-layers", str(student_layers), "--batches", "2", "--batch-size", "4", "--max-seq-length", "32",
                   "--betas", "10,100", "--output", str(tmp_path / "signal.json")])
    m = result["mean"]
    assert (tmp_path / "signal.md").read_text().startswith("**mrpc** PKD-last")
    if zero:  # 6 → 6 layers, "last" maps student layer j to teacher layer j: the same weights, the same vectors
        assert result["layer_map"] == [1, 2, 3, 4, 5]
        assert m["pt"] < 1e-10 and m["grad_pt"] < 1e-6 and min(m["pair_cosine"]) > 0.9999
    else:
        assert result["layer_map"] == [4, 5] and m["pt"] > 0 and m["grad_pt"] > 0
        assert max(m["pair_cosine"]) < 0.9999
    ratio = result["by_beta"]
    assert ratio["100"]["grad_ratio_pt_to_kd"] == pytest.approx(10 * ratio["10"]["grad_ratio_pt_to_kd"])
    assert all(-1 <= c <= 1 + 1e-6 for c in m["teacher_cross_cosine"])
