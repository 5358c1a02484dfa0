"""Every supported encoder family as teacher and student: the adapter against the Hugging Face classes
(where its pieces live, its attention, its inputs, its MLM head on gathered rows ≡ the full logits), the
family and tokenizer guards, and both objectives end to end on tiny random-init models of each family
(1 rank in-process; BERT, RoBERTa and ModernBERT also on 2 ranks), the fused kernels included."""

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AlbertConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig, RobertaConfig

from pkd_fast import families, models
from pkd_fast.dist import _free_port
from pkd_fast.errors import PkdError
from pkd_fast.families import family_of
from pkd_fast.faults import FAULT_ENV
from pkd_fast.tasks import get_task
from pkd_fast.train import main
from test_config import assert_one_line_error
from test_mlm_train import write_sentences
from test_train import GLUE_DIR, ds_json, train, train_log, zero3_json
from tiny_families import LAYERS, SHAPES, WIDTH, char_tokenizer, save_tiny, tiny_config

E2E = ["bert", "roberta", "electra", "deberta-v2", "modernbert", "distilbert"]  # xlm-roberta: RoBERTa's code, adapter-tested
TWO_RANKS = ["bert", "roberta", "modernbert"]


def built(model_type, auto=AutoModelForMaskedLM, **overrides):
    torch.manual_seed(0)
    return auto.from_config(tiny_config(model_type, char_tokenizer(), **overrides)).eval()


@pytest.mark.parametrize("model_type", list(SHAPES))
def test_adapter_names_the_pieces_of_its_family(model_type):
    mlm, classifier = built(model_type), built(model_type, AutoModelForSequenceClassification)
    family = family_of(mlm.config)
    assert isinstance(families.module_at(mlm.base_model, family.embeddings), torch.nn.Module)
    assert len(family.layer_modules(mlm)) == LAYERS
    for path in (family.pooler, *family.classifier):
        if path is not None:
            assert isinstance(families.module_at(classifier, path), torch.nn.Module), path
    assert any(hasattr(mlm, name) for name in family.mlm_head)
    projections = family.attention_projections(mlm)
    assert len(projections) == LAYERS and all(isinstance(p, torch.nn.Linear) for layer in projections for p in layer)
    assert sum(p.out_features for p in projections[0]) == 3 * mlm.config.hidden_size
    # SDPA exactly where transformers has it, and the model built with it
    assert (family.attention == "sdpa") == type(mlm)._supports_sdpa
    loaded = AutoModelForMaskedLM.from_config(mlm.config, **families.attention_kwargs(mlm.config))
    assert loaded.config._attn_implementation == family.attention
    assert any(key.startswith(mlm.base_model_prefix + family.layer_prefix(LAYERS - 1)) for key in mlm.state_dict())


@pytest.mark.parametrize("model_type", list(SHAPES))
def test_the_head_on_gathered_rows_gives_the_full_forwards_logits(model_type):
    model = built(model_type)
    with torch.no_grad():  # a non-trivial head: some are initialised with a zero bias and unit norms
        for name, p in model.named_parameters():
            if not name.startswith(model.base_model_prefix + "."):
                p.add_(0.1 * torch.randn_like(p))
    tokenizer = char_tokenizer()
    batch = tokenizer(["a short one", "and a somewhat longer pair"], ["x", "y z"], padding=True, return_tensors="pt")
    inputs = families.model_inputs(model, dict(batch))
    assert ("token_type_ids" in inputs) == (model_type in ("bert", "electra"))  # 1 type (RoBERTa), 0 (DeBERTa-v3), none
    rows = batch["attention_mask"].flatten().nonzero().squeeze(1)
    with torch.no_grad():
        full = model(**inputs).logits.flatten(0, 1)[rows]
        gathered, _ = models.MaskedLMRows(model)(**batch, row_index=rows)
    torch.testing.assert_close(gathered, full)


def test_a_modernbert_student_keeps_the_attention_kind_of_each_layer_it_copies():
    teacher = built("modernbert")
    kinds = teacher.config.layer_types
    assert len(set(kinds)) == 2
    student = models.build_mlm_student(teacher, (2, 3))
    assert student.config.layer_types == kinds[1:3] and student.config.num_hidden_layers == 2
    for j, t in enumerate((2, 3)):
        assert student.model.layers[j].attention_type == kinds[t - 1]
        assert torch.equal(student.model.layers[j].attn.Wqkv.weight, teacher.model.layers[t - 1].attn.Wqkv.weight)


def test_unsupported_families_are_refused_by_name(tmp_path, capsys):
    AlbertConfig(vocab_size=99, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(PkdError, match="a 'albert' model .*shared.*; pkd_fast supports BERT, RoBERTa \\(and XLM-R\\), ELECTRA, "
                                       "DeBERTa-v2, ModernBERT, DistilBERT"):
        models.model_config("--teacher", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("some text\n")
    assert_one_line_error(capsys, ["--objective", "mlm", "--teacher", str(tmp_path), "--text-files", str(tmp_path / "corpus.txt"),
                                   "--max-steps", "1", "--output-dir", str(tmp_path / "out")], "pkd_fast supports BERT")


def test_max_seq_length_counts_robertas_padding_offset():
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)  # the released checkpoints'
    models.check_max_seq_length(512, "--teacher", roberta)
    with pytest.raises(PkdError, match=r"\(520\) exceed the 512 positions \(514 embeddings less RoBERTa's offset of 2\)"):
        models.check_max_seq_length(513, "--teacher", roberta)
    models.check_max_seq_length(513, "--teacher", BertConfig(max_position_embeddings=520))


@pytest.mark.parametrize("other, message", [
    (dict(lower_case=False), "lower-casing False vs the teacher's True"),
    (dict(extra=("##xyz",)), f"vocabulary size {len(char_tokenizer()) + 1} vs the teacher's {len(char_tokenizer())}"),
])
def test_a_base_model_with_another_tokenizer_is_refused_before_any_work(tmp_path, capsys, other, message):
    teacher = save_tiny(tmp_path / "teacher", "bert")
    base = save_tiny(tmp_path / "base", "bert")
    char_tokenizer(**other).save_pretrained(base)
    assert_one_line_error(capsys, ["--deepspeed", ds_json(tmp_path), "--task", "mrpc", "--teacher", teacher, "--init-from",
                                   "pretrained", "--base-model", base, "--glue-dir", str(GLUE_DIR), "--max-seq-length", "32",
                                   "--output-dir", str(tmp_path / "out")],
                          f"--base-model {base}: its tokenizer is not the teacher's: {message}")


# -- both objectives, every family --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"root": root, "text": write_sentences(root / "train.txt", 0, 200),
            "zero2": ds_json(root, train_micro_batch_size_per_gpu=4), "zero3": zero3_json(root, train_micro_batch_size_per_gpu=4)}


def glue_args(teacher, out, ds):
    """MRPC (pairs: segment ids 0 and 1): the teacher fine-tuned a step, its cache written, a 2-layer PKD-Skip
    student (KD + PT over every token) reading it."""
    return ["--deepspeed", ds, "--task", "mrpc", "--teacher", teacher, "--glue-dir", str(GLUE_DIR), "--max-seq-length", "32",
            "--max-train-samples", "8", "--max-eval-samples", "4", "--max-steps", "1", "--student-layers", "2",
            "--strategy", "skip", "--pt-tokens", "all", "--teacher-cache", str(out / "cache"), "--loss-impl", "triton",
            "--log-steps", "1", "--output-dir", str(out / "glue")]


def mlm_args(teacher, text, out, ds):
    """A head fitted on the headless teacher for a step, then a 2-layer student (KL over the masked rows, PT over every real token)."""
    return ["--objective", "mlm", "--deepspeed", ds, "--teacher", teacher, "--text-files", text, "--max-seq-length", "32",
            "--max-steps", "1", "--student-layers", "2", "--student-layer-choice", "alternate", "--beta", "1",
            "--pt-tokens", "all", "--kd-positions", "masked", "--loss-impl", "triton", "--log-steps", "1",
            "--output-dir", str(out / "mlm")]


@pytest.mark.parametrize("model_type", E2E)
def test_every_family_distils_in_both_objectives(shared, model_type):
    """GLUE under ZeRO-3, masked LM under ZeRO-2, one rank each."""
    out = shared["root"] / model_type
    teacher = save_tiny(out / "teacher", model_type)
    glue = main(glue_args(teacher, out, shared["zero3"]))
    assert glue["runs"]["skip"]["layer_map"] == [2] and glue["runs"]["skip"]["student_layers"] == 2
    assert {"ce", "kd", "pt"} <= set(train_log(out / "glue" / "students" / "skip")[0])
    student = AutoModelForSequenceClassification.from_pretrained(out / "glue" / "students" / "skip" / "model")
    assert family_of(student.config) is family_of(AutoModelForMaskedLM.from_pretrained(teacher).config)

    mlm = main(mlm_args(teacher, shared["text"], out, shared["zero2"]))
    assert mlm["runs"]["teacher"]["trains"] == "head only (body frozen)"
    assert mlm["runs"]["alternate"]["layers"] == [1, 3] and mlm["runs"]["alternate"]["dev"]["masked_tokens"] > 0
    row = train_log(out / "mlm" / "students" / "alternate")[0]
    assert all(math.isfinite(row[term]) for term in ("ce", "kd", "pt"))  # all three terms ran
    saved = out / "mlm" / "students" / "alternate" / "model"
    assert models.has_mlm_head(str(saved)) and not models.has_mlm_head(teacher)


DRIVER = """
from pkd_fast.train import main
for argv in {runs!r}:
    main(argv)
"""


@pytest.mark.slow
def test_two_ranks_bert_roberta_modernbert_in_both_objectives(shared, tmp_path):
    """One 2-rank launch runs, for each family, GLUE under ZeRO-2 and masked LM under ZeRO-3 in turn."""
    runs = []
    for model_type in TWO_RANKS:
        out = tmp_path / model_type
        teacher = save_tiny(out / "teacher", model_type, seed=1)
        runs += [glue_args(teacher, out, shared["zero2"]), mlm_args(teacher, shared["text"], out, shared["zero3"])]
    (tmp_path / "driver.py").write_text(DRIVER.format(runs=runs))
    launch = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(tmp_path / "driver.py")]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for model_type in TWO_RANKS:
        out = tmp_path / model_type
        for run in (out / "glue" / "students" / "skip", out / "mlm" / "students" / "alternate"):
            assert json.loads((run / "results.json").read_text())["dev"], run
            assert len(train_log(run)) == 1


# -- a student of another width ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_narrower_student_from_scratch_learns_pt_through_projections_saved_and_resumed(shared, tmp_path, monkeypatch):
    """--init-from scratch --student-hidden-size 16 under a 32-wide teacher: PT through one learned map per
    mapped layer, which DeepSpeed checkpoints (a SIGKILL after step 2's checkpoint, then --resume, gives the
    uninterrupted run's losses and weights) and the exported Hugging Face model leaves out."""
    teacher = AutoModelForSequenceClassification.from_config(tiny_config("bert", char_tokenizer(), num_labels=2))
    models.label_task(teacher.config, get_task("mrpc"))
    teacher.save_pretrained(tmp_path / "teacher")
    char_tokenizer().save_pretrained(tmp_path / "teacher")
    common = ["--deepspeed", shared["zero2"], "--stage", "student", "--task", "mrpc", "--teacher", str(tmp_path / "teacher"),
              "--init-from", "scratch", "--student-hidden-size", "16", "--student-layers", "2", "--strategy", "skip",
              "--glue-dir", str(GLUE_DIR), "--max-seq-length", "32", "--max-train-samples", "16", "--max-eval-samples", "4",
              "--max-steps", "4", "--save-steps", "2", "--pt-tokens", "all", "--loss-impl", "triton", "--log-steps", "1"]
    whole = tmp_path / "whole"
    main([*common, "--output-dir", str(whole)])
    run = whole / "students" / "skip"
    pt = [row["pt"] for row in train_log(run)]
    assert len(pt) == 4 and all(p > 0 for p in pt)
    exported = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert exported.config.hidden_size == 16 and exported.config.num_hidden_layers == 2
    assert not any("projection" in key for key in load_file(run / "model" / "model.safetensors"))

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # set by the in-process run
        monkeypatch.delenv(key, raising=False)
    killed = tmp_path / "killed"
    proc = train([*common, "--output-dir", str(killed)], env={FAULT_ENV: "ckpt-published@2"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    (state,) = (killed / "students" / "skip" / "checkpoints").glob("step2/*model_states.pt")
    module = torch.load(state, map_location="cpu", weights_only=False)["module"]
    assert module["projections.0.weight"].shape == (WIDTH, 16) and not any("projections.1" in k for k in module)
    resumed = train([*common, "--output-dir", str(killed), "--resume"])
    assert "resumed at step 2" in resumed.stderr
    for a, b in zip(train_log(run), train_log(killed / "students" / "skip"), strict=True):  # PT reads the maps
        assert b["total"] == pytest.approx(a["total"], rel=1e-6) and b["pt"] == pytest.approx(a["pt"], rel=1e-6), a["step"]
    weights = [load_file(d / "model" / "model.safetensors") for d in (run, killed / "students" / "skip")]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7)


def test_a_student_width_that_splits_no_head_is_refused(tmp_path, capsys):
    teacher = save_tiny(tmp_path / "teacher", "bert")  # 32 wide, 2 heads of 16
    assert_one_line_error(capsys, ["--deepspeed", ds_json(tmp_path), "--task", "mrpc", "--teacher", teacher, "--init-from",
                                   "scratch", "--student-hidden-size", "24", "--glue-dir", str(GLUE_DIR), "--max-seq-length", "32",
                                   "--output-dir", str(tmp_path / "out")],
                          "--student-hidden-size 24: must be a multiple of the teacher's attention head size 16")


def test_student_hidden_size_needs_a_student_from_scratch(tmp_path, capsys):
    assert_one_line_error(capsys, ["--student-hidden-size", "16", "--output-dir", str(tmp_path)],
                          "--student-hidden-size only applies with --init-from scratch")
    text = tmp_path / "corpus.txt"
    text.write_text("a sentence\n")
    assert_one_line_error(capsys, ["--objective", "mlm", "--text-files", str(text), "--student-hidden-size", "16",
                                   "--output-dir", str(tmp_path)],
                          "--student-hidden-size only applies with --init-from scratch")  # a general student of any width
