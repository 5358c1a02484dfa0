"""The fused masked-LM head + KD loss (`pkd_fast.head_kd`, `kernels/mlm_head_kd.py`) against the float64 spec
on materialised logits: `kd_loss_reference(hs @ W.T + b, ht @ Wt.T + bt, ...)` for a dense teacher,
`topk_kd_loss_reference` for a top-k one; the loss and the gradients of hs, W and b.

The torch chunked path runs at shapes where several row blocks and vocabulary chunks (not dividing V)
are crossed; the Triton kernels run under the CPU interpreter (tests/conftest.py) at tiny shapes, V not
a multiple of their 64-column tile.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import pkd_fast.head_kd as head_kd
from pkd_fast.head_kd import DenseHead, blocks, head_kd_loss
from pkd_fast.losses import TopkLogits, kd_loss_reference, topk_kd_loss_reference

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def _load_kernel():
    """This checkout's kernels/mlm_head_kd.py as pkd_fast.kernels.mlm_head_kd, whatever the installed
    pkd_fast.kernels points at (an editable install of another checkout)."""
    name = "pkd_fast.kernels.mlm_head_kd"
    path = ROOT / "kernels" / "mlm_head_kd.py"
    module = sys.modules.get(name)
    if module is None or Path(module.__file__).resolve() != path:
        import pkd_fast.kernels  # noqa: F401 (the parent package, for the module's relative import of _common)

        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


KERNEL = _load_kernel()

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread. Two threads on a CPU shared with other processes spin-wait at every
    small op's barrier (measured: 3 s instead of 0.01 s for one two-pass call at 40 rows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_this_checkouts_files_are_tested():
    print(f"testing {head_kd.__file__} and {KERNEL.__file__}")
    assert Path(head_kd.__file__).resolve() == ROOT / "pkd_fast" / "head_kd.py"
    assert Path(KERNEL.__file__).resolve() == ROOT / "kernels" / "mlm_head_kd.py"


def make(n_rows, hidden, t_hidden, vocab, dtype, seed=0, ignore_every=3, scale=1.0):
    """Student (hs, W, b), a dense teacher head, labels with every `ignore_every`-th row ignored."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    student = (rand(n_rows, hidden), rand(vocab, hidden, s=scale / hidden**0.5 * 2), rand(vocab))
    teacher = DenseHead(rand(n_rows, t_hidden), rand(vocab, t_hidden, s=scale / t_hidden**0.5 * 2), rand(vocab))
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return student, teacher, labels


def topk_of(teacher: DenseHead, k: int, temperature: float) -> TopkLogits:
    t = teacher.logits().double()
    values, ids = t.topk(k, dim=1)
    return TopkLogits(ids.int(), values.to(teacher.hidden.dtype), torch.logsumexp(t / temperature, 1).float(), temperature)


def run(student, teacher, temperature, labels, alpha, grad_output=0.7, **kw):
    """(loss, ∂hs, ∂W, ∂b) of head_kd_loss (impl and blocks in kw; impl="dense" with float64 inputs is the spec)."""
    leaves = [x.detach().clone().requires_grad_() for x in student]
    loss = head_kd_loss(*leaves, teacher, temperature, labels, alpha, **kw)
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype))
    return [loss.detach()] + [x.grad for x in leaves]


def spec(student, teacher, temperature, labels, alpha, **kw):
    """The float64 reference on materialised logits (the spec)."""
    kw = {k: v for k, v in kw.items() if k not in ("impl", "block_rows", "vocab_chunk")}
    s64 = [x.double() for x in student]
    if isinstance(teacher, TopkLogits):
        t64 = TopkLogits(teacher.ids, teacher.values.double(), teacher.lse.double(), teacher.temperature)
    else:
        t64 = DenseHead(*(None if x is None else x.double() for x in (teacher.hidden, teacher.weight, teacher.bias)))
    return run(s64, t64, temperature, labels, alpha, impl="dense", **kw)


def rel_errs(got, ref):
    out = []
    for x, r in zip(got, ref):
        x, r = x.double(), r.double()
        assert not x.isnan().any()
        out.append(((x - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return out


def check(got, ref, dtype, eager=None, what=""):
    """fp32: each of loss, ∂hs, ∂W, ∂b within 1e-5 (relative to the largest reference entry) of float64.
    bf16: no worse than the dense path in bf16 (its logits rounded to bf16) plus 1e-2."""
    errs = rel_errs(got, ref)
    bounds = [1e-5] * 4 if dtype == torch.float32 else [e + 1e-2 for e in rel_errs(eager, ref)]
    for name, err, bound in zip(("loss", "d_hs", "d_W", "d_b"), errs, bounds):
        assert err <= bound, f"{what} {name}: error {err:.3g} > {bound:.3g}"


# -- the torch chunked path -------------------------------------------------------------------------------

CHUNKED = [  # (alpha, T, dtype, blocks): every alpha at T = 1 and T ≠ 1, one pass and two, fp32 and bf16
    (0.0, 2.0, torch.float32, {}), (0.5, 1.0, torch.float32, {}), (0.5, 2.0, torch.float32, {}),
    (1.0, 4.0, torch.float32, {}), (1.0, 1.0, torch.float32, {"block_rows": 16, "vocab_chunk": 96}),
    (0.5, 2.0, torch.float32, {"block_rows": 16, "vocab_chunk": 96}), (0.0, 1.0, torch.float32, {"block_rows": 7, "vocab_chunk": 300}),
    (0.5, 2.0, torch.bfloat16, {}), (0.5, 2.0, torch.bfloat16, {"block_rows": 16, "vocab_chunk": 96}),
]  # fmt: skip


@pytest.mark.parametrize("alpha,temperature,dtype,kw", CHUNKED)
def test_chunked_matches_reference(alpha, temperature, dtype, kw):
    student, teacher, labels = make(70, 48, 64, 1001, dtype)
    got = run(student, teacher, temperature, labels, alpha, impl="chunked", **kw)
    eager = run(student, teacher, temperature, labels, alpha, impl="dense") if dtype != torch.float32 else None
    check(got, spec(student, teacher, temperature, labels, alpha), dtype, eager, f"α={alpha} T={temperature} {kw}")


@pytest.mark.parametrize("kw", [{}, {"block_rows": 8, "vocab_chunk": 64}])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_chunked_sum_with_divisors(alpha, kw):
    student, teacher, labels = make(40, 32, 32, 333, torch.float32)
    divisors = torch.tensor([5.0, 11.0])
    args = (student, teacher, 2.0, labels, alpha)
    check(run(*args, impl="chunked", reduction="sum", divisors=divisors, **kw), spec(*args, reduction="sum", divisors=divisors),
          torch.float32, what=f"divisors α={alpha}")  # fmt: skip
    check(run(*args, impl="chunked", reduction="mean", **kw), spec(*args, reduction="mean"), torch.float32, what="mean")


@pytest.mark.parametrize("kw", [{}, {"block_rows": 8, "vocab_chunk": 50}])
def test_chunked_all_labels_ignored(kw):
    """No valid label: CE adds 0 (and no gradient), the KL is untouched; with alpha = 0 everything is 0."""
    student, teacher, labels = make(24, 32, 32, 211, torch.float32)
    labels[:] = IGNORE
    for alpha in (0.0, 0.5):
        got = run(student, teacher, 2.0, labels, alpha, impl="chunked", **kw)
        ref = spec(student, teacher, 2.0, labels, alpha)
        if alpha == 0.0:
            assert all((x == 0).all() for x in got)
        else:
            check(got, ref, torch.float32, what="all ignored")


@pytest.mark.parametrize("k,kw", [(8, {}), (8, {"block_rows": 16, "vocab_chunk": 96}), (64, {"block_rows": 5, "vocab_chunk": 37}),
                                  (301, {}), (301, {"block_rows": 9, "vocab_chunk": 64})])  # fmt: skip
@pytest.mark.parametrize("alpha,temperature", [(1.0, 2.0), (0.5, 1.0)])
def test_chunked_topk_teacher_matches_reference(k, kw, alpha, temperature):
    """The cache form (ids, values, lse at T) against `topk_kd_loss_reference`; k = V has no rest bucket."""
    student, dense, labels = make(50, 32, 48, 301, torch.float32)
    teacher = topk_of(dense, k, temperature)
    got = run(student, teacher, temperature, labels, alpha, impl="chunked", **kw)
    check(got, spec(student, teacher, temperature, labels, alpha), torch.float32, what=f"top-{k} {kw}")


def test_chunked_topk_bf16_and_sum():
    student, dense, labels = make(33, 32, 32, 257, torch.bfloat16)
    teacher = topk_of(dense, 16, 2.0)
    args = (student, teacher, 2.0, labels, 0.5)
    kw = {"reduction": "sum", "divisors": torch.tensor([3.0, 9.0])}
    eager = run(*args, impl="dense", **kw)
    check(run(*args, impl="chunked", block_rows=8, vocab_chunk=100, **kw), spec(*args, **kw), torch.bfloat16, eager, "top-k bf16")


def test_chunked_masked_teacher_vocabulary():
    """Teacher columns at -inf (a masked vocabulary) have probability 0; a row that is all -inf adds no KL."""
    student, teacher, labels = make(20, 16, 16, 150, torch.float32)
    teacher.bias[100:] = float("-inf")
    for kw in ({}, {"block_rows": 4, "vocab_chunk": 64}):
        check(run(student, teacher, 2.0, labels, 0.5, impl="chunked", **kw), spec(student, teacher, 2.0, labels, 0.5),
              torch.float32, what=f"masked {kw}")  # fmt: skip
    teacher.bias[:] = float("-inf")
    got = run(student, teacher, 2.0, labels, 1.0, impl="chunked", block_rows=4, vocab_chunk=64)
    assert all((x == 0).all() for x in got)


@pytest.mark.parametrize("impl", ["chunked", "triton", "dense"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_rows_is_exactly_zero(impl, alpha):
    student, teacher, labels = make(0, 32, 32, 100, torch.float32)
    for reduction, divisors in (("batchmean", None), ("sum", torch.tensor([3.0, 5.0])), ("sum", None), ("mean", None)):
        got = run(student, teacher, 2.0, labels, alpha, impl=impl, reduction=reduction, divisors=divisors)
        assert got[0].item() == 0.0 and not got[0].isnan()
        assert got[1].shape == (0, 32) and (got[2] == 0).all() and (got[3] == 0).all()


def test_default_blocks_bound_the_tile():
    """One pass (C = V) while ≥ MIN_ROWS rows of the full vocabulary fit TILE_ELEMS, else chunks; R·C ≤ TILE_ELEMS."""
    assert blocks(4096, 30522) == (1024, 30522)
    assert blocks(4096, 250002) == (128, 250002)
    r, c = blocks(4096, 2_000_000)
    assert c < 2_000_000 and r * c <= head_kd.TILE_ELEMS
    assert blocks(10, 250002) == (10, 250002)
    assert blocks(100, 1000, block_rows=16, vocab_chunk=96) == (16, 96)
    for n, v in ((4096, 30522), (16384, 128100), (4096, 250002)):
        r, c = blocks(n, v)
        assert r * c <= head_kd.TILE_ELEMS


def test_refusals():
    student, teacher, labels = make(8, 16, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="reductions"):
        head_kd_loss(*student, teacher, 2.0, labels, 0.5, reduction="none")
    with pytest.raises(ValueError, match="labels must lie"):
        head_kd_loss(*student, teacher, 2.0, torch.full((8,), 50), 0.5)
    with pytest.raises(ValueError, match="lse at T=1"):
        head_kd_loss(*student, topk_of(teacher, 4, 1.0), 2.0, labels, 0.5)
    with pytest.raises(ValueError, match="top-k"):
        head_kd_loss(*student, topk_of(teacher, 4, 2.0), 2.0, labels, 0.5, impl="triton")
    with pytest.raises(ValueError, match="teacher head"):
        head_kd_loss(*student, DenseHead(teacher.hidden[:4], teacher.weight, None), 2.0, labels, 0.5)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        leaves = [x.clone().requires_grad_() for x in student]
        loss = head_kd_loss(*leaves, teacher, 2.0, labels, 0.5, impl="chunked")
        loss.backward(retain_graph=True)
        loss.backward()


def test_teacher_gets_no_gradient_and_auto_is_chunked_on_cpu():
    student, teacher, labels = make(8, 16, 16, 50, torch.float32)
    teacher.hidden.requires_grad_()
    got = run(student, teacher, 2.0, labels, 0.5)  # impl auto on CPU
    assert teacher.hidden.grad is None
    check(got, spec(student, teacher, 2.0, labels, 0.5), torch.float32, what="auto")


# -- the Triton kernels (the interpreter on a CPU: tiny shapes) -------------------------------------------

TRITON = [  # (n_rows, hidden, t_hidden, vocab, alpha, T, dtype): V never a multiple of the 64-column tile
    (37, 24, 40, 101, 0.5, 2.0, torch.float32), (37, 24, 40, 101, 0.0, 1.0, torch.float32),
    (19, 32, 16, 70, 1.0, 1.0, torch.float32), (19, 32, 16, 70, 0.5, 1.0, torch.float32),
    (70, 16, 16, 130, 1.0, 3.0, torch.float32), (37, 24, 40, 101, 0.5, 2.0, torch.bfloat16),
]  # fmt: skip


@pytest.mark.parametrize("n_rows,hidden,t_hidden,vocab,alpha,temperature,dtype", TRITON)
def test_triton_matches_reference(n_rows, hidden, t_hidden, vocab, alpha, temperature, dtype):
    student, teacher, labels = make(n_rows, hidden, t_hidden, vocab, dtype)
    got = run(student, teacher, temperature, labels, alpha, impl="triton")
    eager = run(student, teacher, temperature, labels, alpha, impl="dense") if dtype != torch.float32 else None
    check(got, spec(student, teacher, temperature, labels, alpha), dtype, eager, f"triton α={alpha} T={temperature}")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_triton_sum_with_divisors_and_ignored_rows(alpha):
    student, teacher, labels = make(21, 16, 24, 90, torch.float32, ignore_every=2)
    labels[:5] = IGNORE
    divisors = torch.tensor([4.0, 13.0])
    args = (student, teacher, 2.0, labels, alpha)
    check(run(*args, impl="triton", reduction="sum", divisors=divisors), spec(*args, reduction="sum", divisors=divisors),
          torch.float32, what="triton divisors")  # fmt: skip
    if alpha:
        labels[:] = IGNORE
        check(run(*args, impl="triton"), spec(*args), torch.float32, what="triton all ignored")


def test_triton_masked_teacher_and_no_bias():
    student, teacher, labels = make(20, 16, 16, 80, torch.float32)
    teacher.bias[60:] = float("-inf")
    check(run(student, teacher, 2.0, labels, 0.5, impl="triton"), spec(student, teacher, 2.0, labels, 0.5),
          torch.float32, what="triton masked teacher")  # fmt: skip
    no_bias = (student[0], student[1], None)
    leaves = [x.detach().clone().requires_grad_() for x in no_bias[:2]]
    loss = head_kd_loss(*leaves, None, DenseHead(teacher.hidden, teacher.weight, None), 2.0, labels, 0.5, impl="triton")
    loss.backward()
    s64 = [x.double().requires_grad_() for x in no_bias[:2]]
    ref = kd_loss_reference(s64[0] @ s64[1].T, (teacher.hidden @ teacher.weight.T).double(), 2.0, labels, 0.5)
    ref.backward()
    assert max(rel_errs([loss.detach(), *[x.grad for x in leaves]], [ref.detach(), *[x.grad for x in s64]])) < 1e-5


def test_triton_is_deterministic():
    student, teacher, labels = make(30, 16, 16, 100, torch.float32)
    a = run(student, teacher, 2.0, labels, 0.5, impl="triton")
    b = run(student, teacher, 2.0, labels, 0.5, impl="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_topk_reference_form_is_what_the_chunked_path_matches():
    """Sanity of the test's top-k teacher: with k = V it is the dense teacher (both references agree)."""
    student, dense, labels = make(10, 16, 16, 40, torch.float64)
    full = topk_of(dense, 40, 2.0)
    s = torch.nn.functional.linear(*student)
    a = topk_kd_loss_reference(s, full.ids, full.values, full.lse, 2.0, labels, 0.5)
    b = kd_loss_reference(s, dense.logits(), 2.0, labels, 0.5)
    assert torch.allclose(a, b, rtol=1e-6)  # the cache keeps the lse in fp32
