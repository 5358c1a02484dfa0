"""MiniLMv2's relation term wired into the runs (pkd_fast.relations): the hooks catch the Q, K, V the
projections put out, a step's loss carries γ·the reference relation loss of those tensors, a relations-only
masked-LM run needs no MLM head and reads the same relations from the teacher cache as live, a GLUE run with a
narrower student learns them, and every bad value of the new flags is one line. (ZeRO-3 on 2 ranks and
--resume with γ > 0: tests/test_train.py's ZeRO-3 and resume runs carry --relation-weight.)"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from pkd_fast.families import layer_projections
from pkd_fast.losses import Relations, pkd_loss, relation_loss_reference
from pkd_fast.models import load_classifier
from pkd_fast.relations import QkvCapture
from pkd_fast.tasks import get_task
from pkd_fast.teacher import LiveTeacher, Rows
from pkd_fast.train import main
from test_config import assert_one_line_error
from test_train import GLUE_DIR, SMALL, ds_json, train_log
from tiny_families import save_tiny, tiny_config, char_tokenizer

FP32 = {"train_micro_batch_size_per_gpu": 4}


def tiny_batch(rows=3, width=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, width - 5, 4])[:rows]
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 60, (rows, width), generator=generator) * mask, "attention_mask": mask}


@pytest.mark.parametrize("model_type", ["bert", "deberta-v2", "modernbert", "distilbert"])
def test_hooks_catch_what_the_projections_compute_from_the_layers_input(model_type):
    """Layer 2's Q, K, V caught in the forward equal its projections applied to its input (hidden_states[1]; ModernBERT
    normalises it first and fuses the three in Wqkv; DeBERTa runs query/key again on its position embeddings later)."""
    config = tiny_config(model_type, char_tokenizer())
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    capture = QkvCapture(model, 2)
    batch = tiny_batch()
    with torch.no_grad(), capture.recording():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    caught = capture.take()
    layer_input = hidden[1]
    if model_type == "modernbert":
        layer_input = model.layers[1].attn_norm(layer_input)
    with torch.no_grad():
        expected = [proj(layer_input) for proj in layer_projections(model, 2)]
    expected = expected[0].chunk(3, dim=-1) if len(expected) == 1 else expected
    assert len(caught) == 3
    for got, want in zip(caught, expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        model(**batch)  # outside recording() the hooks keep nothing
    with pytest.raises(RuntimeError, match="no Q/K/V recorded"):
        capture.take()
    capture.remove()


def test_a_step_adds_gamma_times_the_reference_relation_loss_of_the_caught_tensors():
    """A live teacher (32 wide, layer 4) and a 16-wide student (layer 2): total = CE + γ·relation_loss_reference on
    the projections' outputs, which need no projection between the widths (R = 2 heads of 16 and of 8)."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(tiny_config("bert", tokenizer, num_labels=2))
    student = AutoModelForSequenceClassification.from_config(
        tiny_config("bert", tokenizer, hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_labels=2))
    batch = {**tiny_batch(), "labels": torch.tensor([0, 1, 1])}
    live = LiveTeacher(teacher, FP32, torch.device("cpu"), logits=False, relation_layer=4)
    capture = QkvCapture(student, 2)
    with capture.recording():
        out = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    student_qkv = torch.stack(capture.take())
    t = live(batch, Rows())
    gamma = 3.0
    terms = pkd_loss(out.logits, None, batch["labels"], gamma=gamma, return_terms=True,
                     relations=Relations(student_qkv, t.qkv, batch["attention_mask"], 2))
    with torch.no_grad():
        teacher_model = live.model
        t_hidden = teacher_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        t_qkv = [proj(t_hidden[3]) for proj in layer_projections(teacher_model, 4)]
        s_qkv = [proj(out.hidden_states[1]) for proj in layer_projections(student, 2)]
    expected_rel = relation_loss_reference(s_qkv, t_qkv, batch["attention_mask"], 2)
    assert expected_rel > 0
    torch.testing.assert_close(terms.rel, expected_rel)
    torch.testing.assert_close(terms.total, terms.ce + gamma * expected_rel)
    terms.total.backward()  # the relation term reaches the student's projections
    assert layer_projections(student, 2)[0].weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("relations")
    rng = random.Random(0)
    words = "the a film movie good bad funny moving story actor plot great dull long short".split()
    (root / "train.txt").write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "\n" for _ in range(40)))
    return root, save_tiny(root / "teacher", "bert"), ds_json(root, train_micro_batch_size_per_gpu=4)


def mlm_args(corpus, *extra):
    root, teacher, ds = corpus
    return ["--objective", "mlm", "--deepspeed", ds, "--teacher", teacher, "--text-files", str(root / "train.txt"),
            "--max-seq-length", "32", "--log-steps", "1", "--loss-impl", "eager", "--max-steps", "3", "--lr", "1e-3",
            "--alpha", "0", "--beta", "0", "--mlm-ce-weight", "0", "--relation-weight", "5", *extra]


def test_relations_alone_need_no_head_and_read_the_same_from_the_cache(corpus, tmp_path):
    """MiniLMv2's general objective on a headless teacher: no head fitted (no teacher run), a bare-encoder student,
    only the relation term logged, scored by its held-out relation loss; a run reading the store (Q/K/V of the
    teacher's last layer, no logits) logs the very same relation losses as the live one."""
    live = main([*mlm_args(corpus), "--output-dir", str(tmp_path / "live")])
    cached = main([*mlm_args(corpus), "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    assert set(live["runs"]) == {"alternate"} and not (tmp_path / "live" / "teacher").exists()
    run = live["runs"]["alternate"]
    assert run["gamma"] == 5.0 and run["dev"]["relation_loss"] > 0 and run["dev"]["tokens"] > 0
    weights = load_file(tmp_path / "live" / "students" / "alternate" / "model" / "model.safetensors")
    assert not any("cls." in key for key in weights) and AutoModel.from_pretrained(tmp_path / "live" / "students" / "alternate" / "model")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["layout"]["relation_layer"] == 4 and not manifest["layout"]["logits"] and "qkv.npy" in manifest["files"]
    logs = [train_log(tmp_path / d / "students" / "alternate") for d in ("live", "cached")]
    assert [r["step"] for r in logs[0]] == [1, 2, 3]
    for a, b in zip(*logs, strict=True):
        assert "ce" not in a and "kd" not in a and a["rel"] > 0 and a["total"] == pytest.approx(5 * a["rel"])
        assert b["rel"] == pytest.approx(a["rel"], rel=1e-6)


def test_a_general_student_from_random_weights_of_another_width_learns_the_relations(corpus, tmp_path):
    """MiniLMv2's kind of general student: random weights, half the teacher's width, relations only. Its own
    run name and width; no weight of it is the teacher's; the relation loss falls over a few steps at a high lr."""
    summary = main([*mlm_args(corpus, "--init-from", "scratch", "--student-hidden-size", "16", "--student-layers", "2",
                              "--max-steps", "6", "--lr", "3e-3"), "--output-dir", str(tmp_path / "out")])
    run = summary["runs"]["scratch_2x16"]
    assert run["student_layers"] == 2 and run["dev"]["relation_loss"] > 0
    model = AutoModel.from_pretrained(tmp_path / "out" / "students" / "scratch_2x16" / "model")
    teacher = AutoModel.from_pretrained(corpus[1])
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 2
    assert model.embeddings.word_embeddings.weight.shape == (teacher.config.vocab_size, 16)
    rel = [r["rel"] for r in train_log(tmp_path / "out" / "students" / "scratch_2x16")]
    assert len(rel) == 6 and rel[-1] < rel[0]


@pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_a_glue_student_of_another_width_learns_the_relations(tmp_path):
    """KD + relations from a tiny 'fine-tuned' teacher (32 wide) into a scratch student 16 wide: the relation term is
    logged beside CE and KD and is in the total; no projection is needed for it."""
    task = get_task("sst2")
    teacher_dir = tmp_path / "teacher"
    save_tiny(teacher_dir, "bert")
    model = load_classifier(str(teacher_dir), task)
    model.save_pretrained(teacher_dir)
    summary = main(["--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=8), "--stage", "student", "--teacher", str(teacher_dir),
                    "--strategy", "kd", "--init-from", "scratch", "--student-hidden-size", "16", "--student-layers", "2",
                    "--relation-weight", "2", "--relation-layers", "3:1", "--max-train-samples", "16", "--max-steps", "2",
                    "--output-dir", str(tmp_path / "out"), *SMALL, "--max-eval-samples", "8"])
    assert summary["runs"]["kd"]["gamma"] == 2.0
    for r in train_log(tmp_path / "out" / "students" / "kd"):
        assert r["rel"] > 0 and r["total"] == pytest.approx(0.3 * r["ce"] + 0.7 * r["kd"] + 2 * r["rel"], rel=1e-5)


BAD = [
    (["--relation-weight", "-1"], "--relation-weight must be >= 0, got -1.0"),
    (["--relation-weight", "nan"], "--relation-weight must be a finite number, got nan"),
    (["--relation-layers", "4"], "argument --relation-layers: expected TEACHER:STUDENT 1-based layers like 12:6, got '4'"),
    (["--relation-layers", "0:1", "--relation-weight", "1"], "--relation-layers must be 1-based TEACHER:STUDENT layers, got 0:1"),
    (["--relation-layers", "4:2"], "--relation-layers only applies with --relation-weight > 0"),
    (["--relation-heads", "0", "--relation-weight", "1"], "--relation-heads must be >= 1, got 0"),
    (["--relation-weight", "1", "--strategy", "ft"], "--relation-weight only applies to students that learn from the teacher"),
    (["--mlm-ce-weight", "0"], "--mlm-ce-weight: not a flag of --objective glue"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_relation_flags_are_one_line(capsys, tmp_path, argv, message):
    assert_one_line_error(capsys, [*argv, "--output-dir", str(tmp_path)], message)


MLM_BAD = [
    (["--relation-layers", "5:1"], "--relation-layers 5:1: teacher layer 5 out of range; the teacher has layers 1..4"),
    (["--relation-layers", "4:3"], "--relation-layers 4:3: student layer 3 out of range; the student has layers 1..2"),
    (["--relation-heads", "3"], "--relation-heads 3: must divide both the teacher's hidden size 32 and the student's 32"),
    (["--relation-weight", "0"], "--alpha 0 --mlm-ce-weight 0 leave no term on the logits: the run needs --relation-weight > 0"),
    (["--mlm-ce-weight", "-1"], "--mlm-ce-weight must be >= 0, got -1.0"),
    (["--init-from", "pretrained"], "--init-from pretrained: --objective mlm starts the student from the teacher's layers"),
    (["--init-from", "scratch", "--beta", "1"], "--init-from scratch with --beta > 0: under --objective mlm a scratch student's"),
    (["--init-from", "scratch", "--student-hidden-size", "12"], "--student-hidden-size 12: must be a multiple of the teacher's attention head size"),
    (["--student-hidden-size", "16"], "--student-hidden-size only applies with --init-from scratch"),
]


@pytest.mark.parametrize("argv, message", MLM_BAD, ids=[m[:40] for _, m in MLM_BAD])
def test_bad_relation_values_against_the_models_are_one_line_before_any_work(capsys, corpus, tmp_path, argv, message):
    assert_one_line_error(capsys, [*mlm_args(corpus), *argv, "--output-dir", str(tmp_path / "out")], message)
    assert not (tmp_path / "out" / "students").exists()
