"""The PKD objective.

The eager functions here are the specification: tests and benchmarks compare the fused Triton kernels
(`pkd_fast.kernels`) against them, never the reverse. `pkd_loss` is the seam where the training loop, the
teacher cache and the kernels meet; `LOSS_IMPLS` picks who computes each term.

    L = (1-α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·PT
    PT = patient loss between L2-normalised student and mapped teacher hidden states
    relations (MiniLMv2, `relation_loss_reference`): KL between teacher and student Q-Q, K-K, V-V relations
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pkd_fast.kernels._common import KD_REDUCTIONS, PT_REDUCTIONS, check_kd_reduction, check_layer_pairs  # noqa: F401 (re-exported)

LOSS_IMPLS = ("auto", "triton", "eager", "compile")

Hidden = Sequence[torch.Tensor] | torch.Tensor


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32, or in float64 when given float64 (so tests get a float64 spec)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha)·CE(s, labels), accumulated in fp32 or wider.

    KL reductions: batchmean ÷N (Hinton, the PKD paper), sum, none (per row), mean ÷N·V (the authors' code).
    The CE term is averaged over the rows whose label is not `ignore_index` (torch's CE semantics) for
    batchmean/mean, summed for sum, per row for none; a batch with every row ignored contributes 0, and
    so does a batch of no rows at all (N = 0), in every reduction, with a zero gradient.
    Teacher entries of -inf have probability 0 and add nothing to the KL.

    `divisors` (with reduction "sum" only): a device tensor [CE divisor, KL divisor] the two sums are
    divided by. The masked-LM objective passes each micro-batch's share of its optimizer step's masked
    tokens and KL rows (`pkd_fast.trainer`), so every token of the step weighs the same; a tensor, not a
    number, so that count never syncs with the host.
    """
    check_kd_reduction(reduction, divisors)
    s = _acc(student_logits)
    n_rows, vocab = s.shape
    loss = s.new_zeros(n_rows if reduction == "none" else ())
    if alpha != 0.0:
        t = _acc(teacher_logits)
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        p_t = log_p_t.exp()
        kl_rows = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)
        loss = loss + alpha * temperature**2 * _reduce_kl(kl_rows, reduction, vocab, divisors)
    if alpha != 1.0:
        loss = loss + (1.0 - alpha) * _ce_term(s, labels, ignore_index, reduction, divisors)
    return loss


def _reduce_kl(kl_rows: torch.Tensor, reduction: str, vocab: int, divisors: torch.Tensor | None) -> torch.Tensor:
    """The KL rows reduced as `kd_loss_reference` documents (N = 0 rows reduce to exactly 0)."""
    n_rows = kl_rows.shape[0]
    return {
        "batchmean": lambda: kl_rows.sum() / max(n_rows, 1),
        "sum": lambda: kl_rows.sum() if divisors is None else kl_rows.sum() / divisors[1],
        "none": lambda: kl_rows,
        "mean": lambda: kl_rows.sum() / max(n_rows * vocab, 1),
    }[reduction]()


def _ce_term(s: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, reduction: str, divisors: torch.Tensor | None) -> torch.Tensor:
    """CE(s, labels) reduced as `kd_loss_reference` documents; ignored labels add nothing."""
    if labels is None:
        raise ValueError("labels are required when alpha < 1 (the CE term has weight 1 - alpha)")
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    ce_rows = -F.log_softmax(s, dim=-1).gather(-1, safe_labels[:, None]).squeeze(-1)
    ce_rows = torch.where(valid, ce_rows, 0.0)
    if reduction == "none":
        return ce_rows
    if reduction == "sum":
        return ce_rows.sum() if divisors is None else ce_rows.sum() / divisors[0]
    return ce_rows.sum() / valid.sum().clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler): -expm1 near 0, log1p(-exp) below -ln 2.
    x >= 0 gives -inf (no mass left), so a rounding that pushes x just above 0 is clamped, not NaN."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_lse: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kd_loss_reference` with the teacher given by its top-k logits: sparse KD, no [N, V] teacher row.

    The teacher of each row is `teacher_ids` [N, k] (distinct ids in [0, V), any order), their raw logits
    `teacher_values` [N, k] and `teacher_lse` [N] = logsumexp(t / T) over the FULL row at the temperature
    of this call. Its distribution is the k probabilities p_i = exp(t_i/T - lse) plus one bucket holding
    the rest of its mass, p_rest = 1 - Σ p_i; the student's matching bucket is its mass off the k ids,
    q_rest = exp(lse_{j∉k}(s_j/T) - lse(s/T)), so the KL is over k + 1 outcomes:

        KL_row = Σ_i p_i·(log p_i - log q_i) + p_rest·(log p_rest - log q_rest)

    with alpha·T², the reductions, `divisors`, the CE term and the N = 0 rule exactly as in
    `kd_loss_reference`. With k = V (every column named) the rest bucket is empty and this is dense KD.

    Why the lse at T, not at 1: p_i at T needs the full row's lse at T, which the top-k alone cannot give
    (lse(t/T) is not a function of lse(t) and the top k). So a cache stores, next to the raw top-k logits
    (the same ids at every T: the order does not change), the lse at the configured T, and its
    fingerprint includes T; another T needs another cache, never a silently wrong teacher.

    Numerics: log q_rest is an lse over the student's non-top-k columns (the top-k masked to -inf), never
    log(1 - Σ q_i), which loses every digit when the student puts its mass on the k ids. log p_rest is
    log1mexp(lse(log p_i)), clamped: a top-k mass that rounds to ≥ 1 (a rest below fp32's resolution)
    gives p_rest = 0, which adds nothing to the loss or its gradient; with k = V the bucket is empty and
    p_rest = 0 by definition, whatever Σ p_i rounds to. The gradient w.r.t. s is
    (softmax(s/T) - p̃)/T, p̃ = p_i on the top-k and p_rest·q_j/q_rest elsewhere: the rest bucket's target
    spread over the non-top-k columns in proportion to the student's own mass there.
    """
    check_kd_reduction(reduction, divisors)
    s = _acc(student_logits)
    n_rows, vocab = s.shape
    loss = s.new_zeros(n_rows if reduction == "none" else ())
    if alpha != 0.0:
        ids = teacher_ids.long()
        scaled = s / temperature
        lse_s = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_q = scaled.gather(-1, ids) - lse_s
        in_topk = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, ids, True)
        no_rest = in_topk.all(-1, keepdim=True)  # k = V: an lse over nothing has a NaN gradient, so skip it
        rest_s = torch.logsumexp(torch.where(in_topk & ~no_rest, float("-inf"), scaled), dim=-1, keepdim=True)
        log_q_rest = torch.where(no_rest, float("-inf"), rest_s - lse_s)
        log_p = _acc(teacher_values).to(s.dtype) / temperature - teacher_lse.to(s.dtype)[:, None]
        p = log_p.exp()
        log_p_rest = log1mexp(torch.logsumexp(log_p, dim=-1, keepdim=True))
        log_p_rest = torch.where(no_rest, float("-inf"), log_p_rest)  # k = V: nothing is left, whatever rounds
        p_rest = log_p_rest.exp()
        kl_rows = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        kl_rows = kl_rows + torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), 0.0).squeeze(-1)
        loss = loss + alpha * temperature**2 * _reduce_kl(kl_rows, reduction, vocab, divisors)
    if alpha != 1.0:
        loss = loss + (1.0 - alpha) * _ce_term(s, labels, ignore_index, reduction, divisors)
    return loss


def patient_loss_reference(
    student_hidden: Hidden,
    teacher_hidden: Hidden,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Σ_l mean_i ‖ĥs_li − ĥt_li‖² over L layer pairs of [N, H] rows, ĥ = h / max(‖h‖, 1e-12).

    reduction: mean as written; elementwise_mean further ÷(L·H), the authors' code scale on which their
    β grid (10–1000) was searched; sum is the paper's Σ_l Σ_i form.
    """
    if not check_layer_pairs(student_hidden, teacher_hidden, reduction):
        return torch.zeros(())
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        hs, ht = _acc(hs), _acc(ht)
        if normalize:
            hs, ht = F.normalize(hs, dim=-1, eps=1e-12), F.normalize(ht, dim=-1, eps=1e-12)
        rows = (hs - ht).pow(2).sum(-1)
        total = total + (rows.sum() if reduction == "sum" else rows.mean())
    if reduction == "elementwise_mean":
        total = total / (len(student_hidden) * student_hidden[0].shape[-1])
    return total


QKV = Sequence[torch.Tensor] | torch.Tensor


def relation_loss_reference(
    student_qkv: QKV, teacher_qkv: QKV, attention_mask: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """MiniLMv2's self-attention relation loss (Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention
    Relation Distillation for Compressing Pretrained Transformers", §3.1), accumulated in fp32 or wider.

    Each side is (q, k, v), each [B, T, H], or a stacked [3, B, T, H] tensor; the teacher's H may differ
    from the student's. Each X of q, k, v is split into R = `n_heads` relation heads of size d = H/R
    (the same R on both sides, so the relations compare whatever the attention head counts), and
        relation(X)_r = softmax(X_r X_rᵀ / √d)   over the real keys (attention_mask [B, T] nonzero)
        loss = Σ_{X ∈ q,k,v} 1/(R·N) Σ_b Σ_r Σ_{real i} KL(relation(X_t)_r[i] ‖ relation(X_s)_r[i])
    N being the real query rows of the batch, so every token weighs the same (as DESIGN.md asks of the
    masked-LM terms; the paper's 1/(A_r·|x|) per sequence is this with one sequence). Padded query rows
    and keys contribute nothing; a batch without a real token gives 0. The paper's relation loss is its
    Q-Q, K-K and V-V terms summed with weight 1 each, as here. The equation numbers could not be
    confirmed against the paper's text here (only its abstract and introduction were reachable).
    """
    student, teacher = _qkv(student_qkv), _qkv(teacher_qkv)
    real = attention_mask.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, T(query), T(key)]
    total = 0.0
    for xs, xt in zip(student, teacher):
        log_p_s, log_p_t = _relation_log_probs(xs, real, n_heads), _relation_log_probs(xt, real, n_heads)
        total = total + torch.where(pairs, log_p_t.exp() * (log_p_t - log_p_s), 0.0).sum()
    return total / (n_heads * real.sum().clamp(min=1))


def _qkv(qkv: QKV) -> Sequence[torch.Tensor]:
    tensors = qkv.unbind(0) if isinstance(qkv, torch.Tensor) else tuple(qkv)
    if len(tensors) != 3:
        raise ValueError(f"relations need (q, k, v), got {len(tensors)} tensors")
    return tensors


def _relation_log_probs(x: torch.Tensor, real: torch.Tensor, n_heads: int) -> torch.Tensor:
    """log softmax(X_r X_rᵀ/√d) over the real keys, [B, R, T, T]. Padded keys get the dtype's lowest
    finite score, not -inf: a row with no real key (an all-padding sequence) stays finite, so the rows
    the loss masks out pass no NaN into the gradient."""
    batch, seq_len, hidden = x.shape
    if hidden % n_heads:
        raise ValueError(f"{n_heads} relation heads do not divide the hidden size {hidden}")
    heads = _acc(x).view(batch, seq_len, n_heads, hidden // n_heads).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(hidden // n_heads)
    scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def regression_kd_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor | None, labels: torch.Tensor, alpha: float):
    """Regression (STS-B) counterpart of the KD term: (1-α)·MSE to the label + α·MSE to the teacher."""
    s = student_pred.float().view(-1)
    loss = (1.0 - alpha) * F.mse_loss(s, labels.float().view(-1)) if alpha != 1.0 else s.new_zeros(())
    if alpha != 0.0:
        loss = loss + alpha * F.mse_loss(s, teacher_pred.float().view(-1))
    return loss


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _fused():
    try:
        from pkd_fast import kernels
    except ImportError as err:  # triton missing or the kernels not built for this platform
        raise RuntimeError(f"--loss-impl triton needs pkd_fast.kernels, which failed to import: {err}") from err
    return kernels


def resolve_impl(impl: str, device: torch.device, *, wide: bool = False) -> str:
    """What computes the loss terms. 'auto' means the fused Triton kernels on CUDA; elsewhere torch.compile
    where it pays for itself, else the eager reference.

    `wide`: the loss reads vocabulary-sized logits (the masked-LM objective) or every token's hidden states
    (--pt-tokens all). Measured on a CPU (benchmarks/results/loss_impl_cpu.md): compile's first call costs
    seconds, which it repays after ~2 steps on vocabulary KD (3.6× the eager speed) and ~250 steps on
    every-token PT (10.6×), but only after ~37,000 steps on GLUE's class logits and [CLS] pairs, so those
    stay eager. Inductor on a CPU also needs a C++ compiler; without one, auto stays eager.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        return "triton"
    return "compile" if wide and _cpp_compiler() else "eager"


def _cpp_compiler() -> str | None:
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def _by_impl(reference, fused: str):
    """`reference`'s contract, computed by `impl`: the eager reference itself, it under torch.compile, the
    fused Triton kernel `pkd_fast.kernels.<fused>`, or "auto": the kernel where the first tensor is on CUDA,
    the eager reference elsewhere (the recipes pass what `resolve_impl` chose for the whole run)."""
    def loss(*args, impl: str = "auto", **kwargs) -> torch.Tensor:
        if impl == "auto":
            impl = resolve_impl(impl, _first_tensor(args).device)
        if impl == "triton":
            return getattr(_fused(), fused)(*args, **kwargs)
        if impl not in LOSS_IMPLS:
            raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r}")
        return (_compiled(reference) if impl == "compile" else reference)(*args, **kwargs)

    loss.__name__ = reference.__name__.removesuffix("_reference")
    loss.__doc__ = (f"`{reference.__name__}` computed by `impl`: auto (the fused Triton kernel on CUDA, eager elsewhere), "
                    f"triton, eager or compile. Same arguments, shapes, dtypes and reductions:\n\n{reference.__doc__}")
    return loss


def _first_tensor(args) -> torch.Tensor:
    """The first tensor of a loss's arguments (a layer list's first), whose device picks the "auto" impl."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0]
    raise TypeError("the loss was given no tensor")


kd_loss = _by_impl(kd_loss_reference, "fused_kd_loss")
topk_kd_loss = _by_impl(topk_kd_loss_reference, "fused_topk_kd_loss")
patient_loss = _by_impl(patient_loss_reference, "fused_patient_loss")
relation_loss = _by_impl(relation_loss_reference, "fused_relation_loss")


@dataclass
class TopkLogits:
    """A teacher's logits of N rows compressed to its top k (a masked-LM teacher cache stores this form):
    `ids` [N, k] int32 (distinct per row), `values` [N, k] the teacher's raw logits at those ids (training
    dtype), `lse` [N] fp32 = logsumexp(t / T) of the teacher's FULL row at `temperature` (the top k alone
    cannot give it, see `topk_kd_loss_reference`). `pkd_loss` takes it wherever it takes dense [N, V]
    teacher logits and computes the sparse KD; a `temperature` other than the loss's is refused."""

    ids: torch.Tensor
    values: torch.Tensor
    lse: torch.Tensor
    temperature: float

    def tensors(self) -> list[torch.Tensor]:
        """What the non-finite guard watches (ids are integers: always finite)."""
        return [self.values, self.lse]


TeacherLogits = torch.Tensor | TopkLogits  # dense [N, C] rows, or their top-k form


def _kd_term(student_logits, teacher_logits: TeacherLogits | None, temperature, labels, *, alpha, impl="eager", reference=False, **reduce):
    """The (1-α)·CE + α·T²·KL term from either teacher form (`reference`: the eager spec, for logging)."""
    if isinstance(teacher_logits, TopkLogits):
        if teacher_logits.temperature != temperature:
            raise ValueError(f"top-k teacher logits hold the lse at T={teacher_logits.temperature:g}, the loss runs at T={temperature:g}")
        args = (student_logits, teacher_logits.ids, teacher_logits.values, teacher_logits.lse, temperature, labels)
        return topk_kd_loss_reference(*args, alpha=alpha, **reduce) if reference else topk_kd_loss(*args, alpha=alpha, impl=impl, **reduce)
    args = (student_logits, teacher_logits, temperature, labels)
    return kd_loss_reference(*args, alpha=alpha, **reduce) if reference else kd_loss(*args, alpha=alpha, impl=impl, **reduce)


@dataclass
class LossTerms:
    """The step's loss and, when asked for, its detached unweighted parts for logging."""

    total: torch.Tensor
    ce: torch.Tensor | None = None  # CE (or MSE to the label, for regression)
    kd: torch.Tensor | None = None  # T²·KL (or MSE to the teacher's prediction)
    pt: torch.Tensor | None = None  # patient loss, before β
    rel: torch.Tensor | None = None  # MiniLMv2 relation loss, before γ


@dataclass
class Relations:
    """The relation term's inputs for one batch (`relation_loss_reference`): each side's (q, k, v) of the
    chosen layers, the batch's [B, T] attention mask and the number of relation heads."""

    student_qkv: QKV
    teacher_qkv: QKV
    attention_mask: torch.Tensor
    heads: int


def pkd_loss(
    student_logits: torch.Tensor | None,
    teacher_logits: TeacherLogits | None,
    labels: torch.Tensor | None,
    student_hidden: Sequence[torch.Tensor] = (),
    teacher_hidden: Sequence[torch.Tensor] = (),
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.0,
    regression: bool = False,
    pt_reduction: str = "elementwise_mean",
    impl: str = "eager",
    return_terms: bool = False,
    divisors: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    gamma: float = 0.0,
    relations: Relations | None = None,
) -> LossTerms:
    """w·(1-α)·CE + α·T²·KL + β·PT + γ·relations for one batch; FT is α=β=γ=0, KD is β=0, w = `ce_weight`.

    `teacher_logits`: dense rows, or a `TopkLogits` (sparse KD from the teacher's top k; not for
    regression). CE and KL are means over the batch's rows (GLUE), or with `divisors` (the masked-LM objective) sums
    divided by them (`kd_loss_reference`): then a batch with no rows adds exactly zero.

    `student_hidden`/`teacher_hidden` are the mapped layer pairs, already reduced to the rows the patient
    loss reads ([CLS] or every real token), so a live teacher and the teacher cache feed it alike.

    `ce_weight` w (the masked-LM objective's --mlm-ce-weight): the CE and KL terms are computed as one
    c·[(1-α')·CE + α'·T²·KL] with c = α + w(1-α), α' = α/c, so the fused kernels serve any w; w = 1 is the
    plain call, and with α = w = 0 the term is absent (no logits are read: `student_logits` may be None).
    `relations` with γ > 0 adds γ·`relation_loss` (MiniLMv2); with `divisors` it carries a third entry,
    the micro-batch's share of the step's real tokens, so every query row of the step weighs the same.
    With `return_terms`, the unweighted parts are recomputed eagerly without grad, for logging only.
    """
    if alpha > 0.0 and teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher logits")
    reduce = {} if divisors is None else {"reduction": "sum", "divisors": divisors[:2]}
    scale = 1.0 if ce_weight == 1.0 else alpha + ce_weight * (1.0 - alpha)
    if regression:
        total = regression_kd_loss(student_logits, teacher_logits, labels, alpha)
    elif scale > 0.0:
        kd_alpha = alpha if scale == 1.0 else alpha / scale
        total = scale * _kd_term(student_logits, teacher_logits, temperature, labels, alpha=kd_alpha, impl=impl, **reduce)
    else:  # α = w = 0: no term reads the logits
        total = 0.0
    use_pt = beta > 0.0 and len(student_hidden) > 0
    if use_pt:
        total = total + beta * patient_loss(student_hidden, teacher_hidden, reduction=pt_reduction, impl=impl)
    use_rel = gamma > 0.0 and relations is not None
    if use_rel:
        rel_share = 1.0 if divisors is None else relations.attention_mask.sum() / divisors[2]
        total = total + gamma * rel_share * relation_loss(relations.student_qkv, relations.teacher_qkv, relations.attention_mask,
                                                         relations.heads, impl=impl)
    terms = LossTerms(total if torch.is_tensor(total) else torch.zeros(()))
    if return_terms:
        with torch.no_grad():
            if regression:
                s = student_logits.detach()
                terms.ce = regression_kd_loss(s, None, labels, 0.0)
                terms.kd = regression_kd_loss(s, teacher_logits, labels, 1.0) if teacher_logits is not None else None
            elif student_logits is not None:
                s = student_logits.detach()
                terms.ce = kd_loss_reference(s, s, 1.0, labels, alpha=0.0, **reduce)
                if teacher_logits is not None:
                    terms.kd = _kd_term(s, teacher_logits, temperature, None, alpha=1.0, reference=True, **reduce)
            if use_pt:
                terms.pt = patient_loss_reference(
                    [h.detach() for h in student_hidden], teacher_hidden, reduction=pt_reduction
                )
            if use_rel:
                student_qkv = [x.detach() for x in _qkv(relations.student_qkv)]
                terms.rel = rel_share * relation_loss_reference(student_qkv, relations.teacher_qkv, relations.attention_mask,
                                                                relations.heads)
    return terms


# -- the losses as modules (Liger's face: a function and a thin nn.Module each) ------------------------------

class KDLoss(torch.nn.Module):
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE(s, labels) (`kd_loss`). forward(student_logits [N, C],
    teacher_logits [N, C], labels [N] or None) → a scalar (a vector [N] with reduction "none"); logits of
    any float dtype, accumulated in fp32; labels equal to `ignore_index` are left out of CE."""

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 impl: str = "auto"):
        super().__init__()
        self.temperature, self.alpha, self.reduction, self.ignore_index, self.impl = temperature, alpha, reduction, ignore_index, impl

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, labels, alpha=self.alpha, ignore_index=self.ignore_index,
                       reduction=self.reduction, impl=self.impl)


class PatientLoss(torch.nn.Module):
    """PKD's patient term (`patient_loss`): Σ over L layer pairs of the mean ‖ĥs − ĥt‖² of L2-normalised rows.
    forward(student_hidden, teacher_hidden): L tensors [N, H] each (or stacked [L, N, H]), any float dtype,
    accumulated in fp32 → a scalar; `reduction` mean, sum or elementwise_mean (÷ L·H, the authors' scale)."""

    def __init__(self, reduction: str = "mean", normalize: bool = True, impl: str = "auto"):
        super().__init__()
        self.reduction, self.normalize, self.impl = reduction, normalize, impl

    def forward(self, student_hidden: Hidden, teacher_hidden: Hidden) -> torch.Tensor:
        return patient_loss(student_hidden, teacher_hidden, self.normalize, self.reduction, impl=self.impl)


class RelationLoss(torch.nn.Module):
    """MiniLMv2's Q-Q, K-K, V-V relation loss (`relation_loss`) over `heads` relation heads. forward(student_qkv,
    teacher_qkv, attention_mask [B, T]): each side (q, k, v) of [B, T, H] (or stacked [3, B, T, H]; the two
    widths may differ, both divisible by `heads`) → a scalar, the mean per real query row."""

    def __init__(self, heads: int, impl: str = "auto"):
        super().__init__()
        self.heads, self.impl = heads, impl

    def forward(self, student_qkv: QKV, teacher_qkv: QKV, attention_mask: torch.Tensor) -> torch.Tensor:
        return relation_loss(student_qkv, teacher_qkv, attention_mask, self.heads, impl=self.impl)
