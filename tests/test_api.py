"""The public API (docs/api.md): the acceptance example of issue #29 through a plain loop and through
`DistillationTrainer`, each giving the CLI's own first logged loss on the same batch and seed; the three
loops of docs/api.md run as written; the losses' functions and modules against their references."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments, set_seed

import pkd_fast
from pkd_fast import data, glue_files
from pkd_fast.config import default_teacher
from pkd_fast.losses import kd_loss_reference, patient_loss_reference, relation_loss_reference
from pkd_fast.models import load_classifier
from pkd_fast.tasks import get_task
from pkd_fast.train import main

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
ROWS, MICRO_BATCH, SEED = 64, 16, 42


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """The offline MiniLM (6 layers) with a fresh SST-2 head and no dropout, saved as a 'fine-tuned' teacher:
    without dropout a step's loss depends only on the batch and the weights."""
    path = tmp_path_factory.mktemp("teacher")
    model = load_classifier(default_teacher(), get_task("sst2"))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(path)
    return str(path)


def test_public_names_are_exported():
    assert {"Distiller", "DistillSpec", "DistillationTrainer", "student_from_teacher", "kd_loss", "patient_loss", "relation_loss",
            "topk_kd_loss", "KDLoss", "PatientLoss", "RelationLoss"} <= set(pkd_fast.__all__)
    for name in pkd_fast.__all__:
        assert getattr(pkd_fast, name).__doc__, name
    with pytest.raises(AttributeError):
        pkd_fast.no_such_name  # noqa: B018


@pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_acceptance_example_gives_the_clis_first_logged_loss(teacher_dir, tmp_path):
    """Issue #29's example, verbatim in its calls: the plain loop's loss and DistillationTrainer's on the CLI's
    first batch equal the CLI's first logged loss (PKD-Skip, 6 → 3 layers, α 0.7, β 100, T 10, fp32)."""
    ds_config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds_config.update(train_micro_batch_size_per_gpu=MICRO_BATCH, tensorboard={"enabled": False})
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    main(["--deepspeed", str(tmp_path / "ds.json"), "--precision", "fp32", "--stage", "student", "--teacher", teacher_dir,
          "--strategy", "skip", "--student-layers", "3", "--alpha", "0.7", "--beta", "100", "--temperature", "10",
          "--glue-dir", str(GLUE_DIR), "--max-train-samples", str(ROWS), "--max-seq-length", "32", "--max-eval-samples", "16",
          "--max-steps", "1", "--log-steps", "1", "--seed", str(SEED), "--output-dir", str(tmp_path / "cli")])
    first = json.loads((tmp_path / "cli" / "students" / "skip" / "train_log.jsonl").read_text().splitlines()[0])

    # the CLI's first batch: its rows, tokenised and grouped by length as its loader draws them for epoch 0
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = data.tokenize(data.subsample(glue_files.load_glue(get_task("sst2"), GLUE_DIR)["train"], ROWS, SEED), tokenizer, 32)
    loader = data.make_loader(rows, tokenizer, MICRO_BATCH, train=True, seed=SEED, group_by_length=True)
    loader.sampler.set_epoch(0)
    batch = {k: v for k, v in next(iter(loader)).items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    set_seed(SEED)  # the CLI draws each student's fresh head right after seeding
    student = pkd_fast.student_from_teacher(teacher, num_layers=3)
    distiller = pkd_fast.Distiller(teacher=teacher, student=student, strategy="skip", alpha=0.7, beta=100, temperature=10)
    assert distiller.spec.layer_map == (2, 4)
    out = distiller(student, batch)
    assert out.loss.item() == pytest.approx(first["total"], rel=1e-5)
    for term in ("ce", "kd", "pt"):
        assert getattr(out.terms, term).item() == pytest.approx(first[term], rel=1e-5, abs=1e-9), term

    # HF's own DeepSpeed JSON ("auto" values and all, which HF fills in), ZeRO-2 on the one-process group the CLI made
    hf_deepspeed = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                    "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    env = dict(os.environ)
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-4,
                             logging_steps=1, save_strategy="no", report_to="none", deepspeed=hf_deepspeed)
    trainer = pkd_fast.DistillationTrainer(model=student, args=args, train_dataset=rows.remove_columns("example_idx"),
                                           data_collator=DataCollatorWithPadding(tokenizer), distiller=distiller)
    assert trainer.compute_loss(student, batch).item() == pytest.approx(first["total"], rel=1e-5)
    before = [p.detach().clone() for p in teacher.parameters()]
    weights = student.classifier.weight.detach().clone()
    try:
        trainer.train()
    finally:  # HF's DeepSpeed state is process-wide (globals and ACCELERATE_* variables): the next Trainer must not inherit it
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        for name in [name for name in os.environ if name.startswith("ACCELERATE_") and name not in env]:
            del os.environ[name]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all({"ce", "kd", "pt"} <= set(entry) for entry in logged)
    assert trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 2
    assert not torch.equal(student.classifier.weight, weights)  # the student learned
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher did not


def api_examples() -> dict[str, str]:
    """docs/api.md's runnable examples (its ```python blocks), by their section title."""
    text = (REPO / "docs" / "api.md").read_text()
    blocks = {}
    for title, body in re.findall(r"^### (.+?)\n(?:.*?\n)*?```python\n(.*?)```", text, flags=re.M | re.S):
        blocks[title] = body
    return blocks


def test_api_page_has_the_three_loops():
    assert set(api_examples()) == {"A plain PyTorch loop", "The Hugging Face Trainer", "An accelerate loop"}


@pytest.mark.parametrize("title", ["A plain PyTorch loop", "The Hugging Face Trainer", "An accelerate loop"])
def test_api_page_examples_run_as_written(title, teacher_dir, tmp_path, monkeypatch, capsys):
    code = api_examples()[title]
    assert code.count('"path/to/fine-tuned-bert"') == 1
    monkeypatch.chdir(tmp_path)  # where the Trainer example writes its student
    scope = {"__name__": "__main__"}
    exec(compile(code.replace('"path/to/fine-tuned-bert"', repr(teacher_dir)), f"docs/api.md: {title}", "exec"), scope)
    loss = scope["out"].loss if "out" in scope else None
    if title == "The Hugging Face Trainer":
        assert (tmp_path / "pkd-student" / "config.json").is_file()
        assert [e for e in scope["trainer"].state.log_history if "kd" in e]
    else:
        assert torch.isfinite(loss) and loss > 0


# -- the losses as functions and modules -----------------------------------------------------------------

def test_loss_functions_and_modules_equal_the_references():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, -100])
    ref = kd_loss_reference(s, t, 4.0, y, alpha=0.3)
    assert torch.allclose(pkd_fast.kd_loss(s, t, 4.0, y, alpha=0.3), ref)
    assert torch.allclose(pkd_fast.KDLoss(temperature=4.0, alpha=0.3)(s, t, y), ref)
    hs, ht = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)], [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    assert torch.allclose(pkd_fast.PatientLoss(reduction="sum")(hs, ht), patient_loss_reference(hs, ht, reduction="sum"))
    qs, qt, mask = torch.randn(3, 2, 7, 8, dtype=torch.float64), torch.randn(3, 2, 7, 12, dtype=torch.float64), torch.ones(2, 7)
    mask[1, 4:] = 0
    assert torch.allclose(pkd_fast.RelationLoss(heads=4)(qs, qt, mask), relation_loss_reference(qs, qt, mask, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        pkd_fast.kd_loss(s, t, 1.0, impl="fast")


def test_distill_spec_refuses_bad_values():
    for fields, message in (({"alpha": 1.5}, "alpha must be in"), ({"pt_tokens": "every"}, "pt_tokens must be one of"),
                            ({"temperature": 0.0}, "temperature must be > 0"), ({"gamma": 1.0}, "gamma > 0 needs relations")):
        with pytest.raises(ValueError, match=message):
            pkd_fast.DistillSpec(**fields)
