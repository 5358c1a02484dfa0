"""The masked-LM KD term fused with the decoder: no [rows, vocab] logits for either model (issue #33).

    head_kd_loss(hs, W, b, teacher, T, labels, alpha, ...)
        == kd_loss_reference(hs @ W.T + b, ht @ Wt.T + bt, T, labels, alpha, ...)     (dense teacher)
        == topk_kd_loss_reference(hs @ W.T + b, ids, values, lse, T, labels, alpha, ...)  (top-k teacher)

`hs` [N, H] are the student's rows after its head's transform (dense + activation + LayerNorm, which stay
in torch and get their gradient through `hs`), `W` [V, H] the decoder (tied to the word embeddings) and
`b` [V] its bias. The teacher is `DenseHead(ht, Wt, bt)` (its transformed rows and its own decoder: its
logits are computed blockwise here too, never held whole) or a `pkd_fast.losses.TopkLogits` (the cache's
form). Reductions "batchmean", "sum" (with `divisors`) and "mean" are `kd_loss_reference`'s; "none" is
refused: a per-row grad_output cannot be applied once the rows are summed into the gradient of W.

This module is the CPU path (pure torch; it runs on any device): rows in blocks of R, the vocabulary in
chunks of C, so the extra memory is O(R·C) however many rows a step has (plus the fp32 gradient of W when
W is not fp32: parameter-sized, not row-sized). The gradient is computed in the forward, as the fused KD
kernels do (`pkd_fast.kernels.kd_loss`), and backward only scales it by grad_output:

  * C ≥ V (the default while R·V fits `TILE_ELEMS` with R ≥ `MIN_ROWS`): one pass. Each row block's full
    logits rows are computed once, their softmax statistics, loss and gradient taken from them, and the
    block's contribution to ∂hs, ∂W, ∂b summed in: 4 matmuls in all, as many as the dense path's forward
    + backward.
  * C < V: two passes. Pass 1 streams each row block over the vocabulary chunks with online (streaming)
    log-sum-exps for the student at 1/T (and at 1 for the CE when T ≠ 1), the teacher at 1/T (dense) or
    the student's non-top-k "rest" bucket (top-k), and the KL numerator; pass 2 recomputes each tile's
    logits, chunk by chunk (vocabulary outer, so ∂W of a chunk is finished before the next), and sums the
    gradients. 6 matmuls (the logits twice).

Teacher entries of -inf (a masked vocabulary) have probability 0; a teacher row that is all -inf adds no
KL (as the fused kernel). The teacher gets no gradient. On CUDA with a dense teacher, `impl="auto"` runs
the Triton kernels of `pkd_fast.kernels.mlm_head_kd` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pkd_fast.kernels._common import check_kd_reduction

TILE_ELEMS = 1 << 25  # elements of one [R, C] tile (128 MiB in fp32); about five such tiles are live at once
MIN_ROWS = 32  # fewer rows a block and the matmuls stream W from memory for little arithmetic: chunk V instead
TWO_PASS_ROWS = 256  # rows a block when the vocabulary is chunked
HEAD_KD_REDUCTIONS = ("batchmean", "sum", "mean")
IMPLS = ("auto", "chunked", "triton", "dense")


@dataclass
class DenseHead:
    """A teacher given by its head: transformed rows `hidden` [N, Ht], decoder `weight` [V, Ht], `bias` [V] or None."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """The teacher's [N, V] logits, materialised (the dense path and tests only)."""
        return torch.nn.functional.linear(self.hidden, self.weight, self.bias)


def blocks(n_rows: int, vocab: int, block_rows: int | None = None, vocab_chunk: int | None = None) -> tuple[int, int]:
    """(R, C): rows a block and vocabulary columns a chunk. Given neither, a one-pass layout (C = V) when
    `MIN_ROWS` rows of the full vocabulary fit `TILE_ELEMS`, with as many rows as fit; else two passes."""
    if vocab_chunk is None:
        if block_rows is None:
            fit = TILE_ELEMS // max(vocab, 1)
            block_rows = max(MIN_ROWS, 1 << (fit.bit_length() - 1)) if fit >= MIN_ROWS else TWO_PASS_ROWS
        vocab_chunk = vocab if block_rows * vocab <= TILE_ELEMS else max(1, TILE_ELEMS // block_rows)
    elif block_rows is None:
        block_rows = max(1, min(TWO_PASS_ROWS, TILE_ELEMS // max(vocab_chunk, 1)))
    if block_rows < 1 or vocab_chunk < 1:
        raise ValueError(f"block_rows and vocab_chunk must be positive, got {block_rows}, {vocab_chunk}")
    return max(1, min(block_rows, max(n_rows, 1))), min(vocab_chunk, max(vocab, 1))


# -- the streaming statistics of one row block --------------------------------------------------------------


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A running max usable as an exponent's offset: -inf (nothing finite seen yet) becomes 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


class _Stats:
    """Pass 1's running statistics of R rows (per row, in the accumulation dtype), fed chunk by chunk."""

    def __init__(self, rows: int, like: torch.Tensor, *, kl: str | None, ce_own: bool, labels: torch.Tensor | None, k: int = 0):
        new = lambda v: torch.full((rows,), v, dtype=like.dtype, device=like.device)  # noqa: E731
        self.kl, self.ce_own, self.labels = kl, ce_own, labels
        self.m_s, self.d_s = new(-math.inf), new(0.0)  # max s, Σ exp((s - m_s)/T)
        self.d_c = new(0.0) if ce_own else None  # Σ exp(s - m_s)
        self.s_y = new(0.0) if labels is not None else None
        if kl == "dense":
            self.m_t, self.d_t, self.acc = new(-math.inf), new(0.0), new(0.0)  # acc = Σ exp((t - m_t)/T)·(t - s)
        elif kl == "topk":
            self.m_r, self.d_r = new(-math.inf), new(0.0)  # the student's non-top-k columns at 1/T
            self.s_ids = torch.zeros((rows, k), dtype=like.dtype, device=like.device)

    def update(self, s, c0, temperature, t=None, topk_mask=None, ids=None):
        """Fold in the chunk s [R, C] of columns c0.. (t: the teacher's chunk; topk_mask: its top-k columns)."""
        m_new = torch.maximum(self.m_s, s.amax(1))
        safe = _safe(m_new)
        if self.ce_own:
            self.d_c = self.d_c * torch.exp(self.m_s - safe) + torch.exp(s - safe[:, None]).sum(1)
        self.d_s = self.d_s * torch.exp((self.m_s - safe) / temperature) + torch.exp((s - safe[:, None]) / temperature).sum(1)
        self.m_s = m_new
        if self.s_y is not None:
            local = self.labels - c0
            inside = (local >= 0) & (local < s.shape[1])
            got = s.gather(1, local.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1)
            self.s_y = torch.where(inside, got, self.s_y)
        if self.kl == "dense":
            m_t = torch.maximum(self.m_t, t.amax(1))
            safe_t = _safe(m_t)
            e = torch.exp((t - safe_t[:, None]) / temperature)
            contrib = torch.where(e > 0, e * (t - s), torch.zeros_like(e)).sum(1)
            scale = torch.exp((self.m_t - safe_t) / temperature)
            self.d_t = self.d_t * scale + e.sum(1)
            self.acc = self.acc * scale + contrib
            self.m_t = m_t
        elif self.kl == "topk":
            rest = s.masked_fill(topk_mask, -math.inf)
            m_r = torch.maximum(self.m_r, rest.amax(1))
            safe_r = _safe(m_r)
            self.d_r = self.d_r * torch.exp((self.m_r - safe_r) / temperature) + torch.exp((rest - safe_r[:, None]) / temperature).sum(1)
            self.m_r = m_r
            local = ids - c0
            inside = (local >= 0) & (local < s.shape[1])
            got = s.gather(1, local.clamp(0, s.shape[1] - 1))
            self.s_ids = torch.where(inside, got, self.s_ids)


@dataclass
class _RowTerms:
    """What pass 2 needs of a row block, and its loss rows."""

    lse_s: torch.Tensor  # logsumexp(s/T)
    lse_c: torch.Tensor  # logsumexp(s) (the CE's), = lse_s when T = 1
    kl_rows: torch.Tensor | None
    ce_rows: torch.Tensor | None
    lse_t: torch.Tensor | None = None  # dense teacher: logsumexp(t/T), +inf on a row with no teacher (p_t = 0)
    has_t: torch.Tensor | None = None
    lse_r: torch.Tensor | None = None  # top-k: logsumexp over the non-top-k s/T (p̃ = p_rest·exp(s/T - lse_r) there)
    log_p: torch.Tensor | None = None  # top-k: the teacher's log p_i [R, k]
    p_rest: torch.Tensor | None = None
    mass: torch.Tensor | None = None  # top-k: Σ p_i + p_rest, 1 unless the top-k mass rounds above 1 (then p_rest = 0)


def _finish(st: _Stats, temperature: float, valid, topk=None) -> _RowTerms:
    """The row block's log-sum-exps and its KL and CE rows from pass 1's statistics."""
    T = temperature
    lse_s = st.m_s / T + torch.log(st.d_s)
    lse_c = (st.m_s + torch.log(st.d_c)) if st.ce_own else lse_s
    ce_rows = None
    if st.s_y is not None:
        ce_rows = torch.where(valid, lse_c - st.s_y, torch.zeros_like(lse_c))
    terms = _RowTerms(lse_s, lse_c, None, ce_rows)
    if st.kl == "dense":
        has_t = st.d_t > 0
        d_t = torch.where(has_t, st.d_t, torch.ones_like(st.d_t))
        m_t = torch.where(has_t, st.m_t, torch.zeros_like(st.m_t))
        kl = st.acc / (d_t * T) + (st.m_s - m_t) / T + torch.log(st.d_s / d_t)
        terms.kl_rows = torch.where(has_t, kl, torch.zeros_like(kl))
        terms.lse_t = torch.where(has_t, m_t / T + torch.log(d_t), torch.full_like(kl, math.inf))
        terms.has_t = has_t
    elif st.kl == "topk":
        values, lse_t, no_rest = topk
        log_p = values / T - lse_t[:, None]
        p = log_p.exp()
        log_q = st.s_ids / T - lse_s[:, None]
        lse_r = st.m_r / T + torch.log(st.d_r)  # -inf where every column is a top-k id
        log_q_rest = torch.where(no_rest, torch.full_like(lse_r, -math.inf), lse_r - lse_s)
        log_p_rest = _log1mexp(torch.logsumexp(log_p, dim=1))
        log_p_rest = torch.where(no_rest, torch.full_like(log_p_rest, -math.inf), log_p_rest)
        p_rest = log_p_rest.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(1)
        kl = kl + torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
        terms.kl_rows, terms.lse_r, terms.log_p, terms.p_rest = kl, lse_r, log_p, p_rest
        terms.mass = p.sum(1) + p_rest  # the derivative of the reference's k + 1 terms: softmax(s/T) times this
    return terms


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`pkd_fast.losses.log1mexp` (log(1 - exp(x)), x clamped to ≤ 0)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tile_grad(s, c0, terms: _RowTerms, temperature, kl_g, ce_g, labels, t=None, topk_mask=None, ids=None):
    """∂loss/∂s of one [R, C] tile (columns c0..), in place over s: kl_g·(softmax(s/T) - p̃) + ce_g·(softmax(s) - onehot(y)).
    kl_g is a scalar (tensor) or [R, 1]; ce_g is [R, 1] (0 on ignored rows)."""
    T = temperature
    p_ce = torch.exp(s - terms.lse_c[:, None]) if ce_g is not None and terms.lse_c is not terms.lse_s else None
    g = None
    if kl_g is not None:
        if t is not None:
            target = torch.exp(t / T - terms.lse_t[:, None])
        else:  # top-k: p_i on the ids, p_rest·exp(s/T - lse_r) elsewhere (0 with no rest bucket)
            lse_r = torch.where(terms.p_rest > 0, terms.lse_r, torch.full_like(terms.lse_r, math.inf))
            target = torch.exp(s / T - lse_r[:, None]) * terms.p_rest[:, None]
            target = target.masked_fill_(topk_mask, 0.0)
            local = ids - c0
            inside = (local >= 0) & (local < s.shape[1])
            p = torch.where(inside, terms.log_p.exp(), torch.zeros_like(terms.log_p))
            target.scatter_add_(1, local.clamp(0, s.shape[1] - 1), p)
        g = torch.exp(s / T - terms.lse_s[:, None])
        if terms.mass is not None:
            g.mul_(terms.mass[:, None])
        g = g.sub_(target).mul_(kl_g)
        del target
    if ce_g is not None:
        p = p_ce if p_ce is not None else torch.exp(s / T - terms.lse_s[:, None])  # T = 1 here
        local = labels - c0
        inside = (local >= 0) & (local < s.shape[1])
        p.scatter_add_(1, local.clamp(0, s.shape[1] - 1)[:, None], torch.where(inside, -1.0, 0.0).to(p.dtype)[:, None])
        p.mul_(ce_g)
        g = p if g is None else g.add_(p)
    return g


def _whole_rows(s, t, temperature, labels, ignore_index, kl_g, ce_w, want_grad):
    """KL rows, CE rows and ∂loss/∂s of R whole rows (s, t: [R, V] logits, consumed): the one-pass layout's
    block, through torch's fused log_softmax (2-3× faster than logsumexp on a CPU), the gradient formed
    in place over buffers already allocated."""
    T = temperature
    kl_rows = ce_rows = g = p_t = None
    log_p_s = F.log_softmax(s / T if T != 1.0 else s, 1) if t is not None or T == 1.0 else None  # CE alone at T ≠ 1: unused
    if t is not None:
        log_p_t = F.log_softmax(t.div_(T) if T != 1.0 else t, 1)
        del t
        has_t = torch.isfinite(log_p_t.amax(1, keepdim=True))  # a row all -inf has no distribution: no KL, no gradient
        p_t = log_p_t.exp()
        if not has_t.all():
            p_t = torch.where(has_t, p_t, torch.zeros((), dtype=p_t.dtype))
        kl_rows = torch.linalg.vecdot(p_t, log_p_t.sub_(log_p_s))
        if kl_rows.isnan().any():  # teacher columns at -inf: 0·(-inf); p_t = 0 there adds nothing
            kl_rows = torch.where(p_t > 0, p_t * log_p_t, torch.zeros((), dtype=p_t.dtype)).sum(1)
        del log_p_t
        kl_rows = torch.where(has_t.squeeze(1), kl_rows, torch.zeros((), dtype=kl_rows.dtype))
        kl_g = torch.where(has_t, kl_g, torch.zeros((), dtype=kl_g.dtype))  # [R, 1]
    log_p_c = None
    if labels is not None:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).long()[:, None]
        log_p_c = log_p_s if T == 1.0 else F.log_softmax(s, 1)
        ce_rows = torch.where(valid, -log_p_c.gather(1, safe).squeeze(1), torch.zeros((), dtype=log_p_c.dtype))
        ce_g = torch.where(valid, ce_w, torch.zeros((), dtype=ce_w.dtype))[:, None]
    del s
    if not want_grad:
        return kl_rows, ce_rows, None
    if p_t is not None:
        g = log_p_s.exp_()  # p_s over log p_s's buffer
        if log_p_c is log_p_s:  # T = 1, both terms: (kl_g + ce_g)·p_s - kl_g·p_t - ce_g·onehot
            g.mul_(kl_g + ce_g).sub_(p_t.mul_(kl_g))
        else:
            g.sub_(p_t).mul_(kl_g)
            if log_p_c is not None:
                g.addcmul_(log_p_c.exp_(), ce_g)
    else:  # CE alone
        g = log_p_c.exp_().mul_(ce_g)
    if log_p_c is not None:
        g.scatter_add_(1, safe, -ce_g.expand_as(safe).to(g.dtype))
    return kl_rows, ce_rows, g


# -- the whole computation -------------------------------------------------------------------------------


def _weights(n_rows, vocab, alpha, temperature, labels, ignore_index, reduction, divisors, like):
    """(kl_w, kl_g, ce_w) as 0-d tensors on `like`'s device (no host sync): the loss is kl_w·ΣKL + ce_w·ΣCE,
    ∂/∂s = kl_g·(p_s - p_t) + ce_w·(softmax(s) - onehot)."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    kl_r = {"batchmean": one / max(n_rows, 1), "mean": one / max(n_rows * vocab, 1), "sum": one}[reduction]
    if reduction == "sum" and divisors is not None:
        kl_r = one / divisors[1].to(like.dtype)
    kl_w = kl_g = ce_w = None
    if alpha != 0.0:
        kl_w, kl_g = alpha * temperature**2 * kl_r, alpha * temperature * kl_r
    if alpha != 1.0:
        if reduction == "sum":
            ce_r = one if divisors is None else one / divisors[0].to(like.dtype)
        else:
            ce_r = one / (labels != ignore_index).sum().clamp(min=1).to(like.dtype)
        ce_w = (1.0 - alpha) * ce_r
    return kl_w, kl_g, ce_w


def _chunked(hs, W, b, teacher, temperature, labels, alpha, ignore_index, reduction, divisors, needs, block_rows, vocab_chunk):
    """The loss and the unscaled gradients (hs, W, b; None where not needed) by row blocks and vocabulary chunks."""
    n_rows, hidden = hs.shape
    vocab = W.shape[0]
    acc = torch.promote_types(hs.dtype, torch.float32)
    dev = hs.device
    T = float(temperature)
    kl = None if alpha == 0.0 else ("topk" if isinstance(teacher, tuple) else "dense")
    has_ce = alpha != 1.0
    ce_own = has_ce and T != 1.0
    kl_w, kl_g, ce_w = _weights(n_rows, vocab, alpha, T, labels, ignore_index, reduction, divisors, torch.empty((), dtype=acc, device=dev))
    R, C = blocks(n_rows, vocab, block_rows, vocab_chunk)
    chunks = [(c0, min(c0 + C, vocab)) for c0 in range(0, vocab, C)]
    W_acc = W if W.dtype == acc else None  # an fp32 copy of W is never made: chunks are upcast one at a time
    b_acc = None if b is None else b.to(acc)
    dense_t = None
    if kl == "dense":
        dense_t = (teacher.hidden, teacher.weight, None if teacher.bias is None else teacher.bias.to(acc))
    if kl == "topk":
        ids_all, values_all, lse_all = teacher
        ids_all = ids_all.long()
        k = ids_all.shape[1]
        no_rest_all = torch.full((n_rows,), k >= vocab, dtype=torch.bool, device=dev)
    want_grad = any(needs)

    def logits(h_blk, w_c, bias_c):
        h_blk, w_c = h_blk.to(acc), w_c.to(acc)
        return h_blk @ w_c.T if bias_c is None else torch.addmm(bias_c, h_blk, w_c.T)

    def student(r0, r1, c0, c1):
        return logits(hs[r0:r1], (W_acc if W_acc is not None else W)[c0:c1], None if b_acc is None else b_acc[c0:c1])

    def teacher_chunk(r0, r1, c0, c1):
        if kl != "dense":
            return None
        h, w, bias = dense_t
        return logits(h[r0:r1], w[c0:c1], None if bias is None else bias[c0:c1])

    def topk_mask(r0, r1, c0, c1):
        if kl != "topk":
            return None
        local = ids_all[r0:r1] - c0
        local = torch.where((local >= 0) & (local < c1 - c0), local, c1 - c0)  # ids off the chunk mark a spare column
        mask = torch.zeros((r1 - r0, c1 - c0 + 1), dtype=torch.bool, device=dev).scatter_(1, local, True)
        return mask[:, : c1 - c0]

    def row_terms(r0, r1, first_tile=None):
        lab = labels[r0:r1] if has_ce else None
        valid = None if lab is None else lab != ignore_index
        st = _Stats(r1 - r0, torch.empty(0, dtype=acc, device=dev), kl=kl, ce_own=ce_own,
                    labels=None if lab is None else torch.where(valid, lab, 0).long(), k=0 if kl != "topk" else k)
        for c0, c1 in chunks:
            s, t = first_tile if first_tile is not None else (student(r0, r1, c0, c1), teacher_chunk(r0, r1, c0, c1))
            st.update(s, c0, T, t, topk_mask(r0, r1, c0, c1), None if kl != "topk" else ids_all[r0:r1])
            del s, t
        topk = None if kl != "topk" else (values_all[r0:r1].to(acc), lse_all[r0:r1].to(acc), no_rest_all[r0:r1])
        return _finish(st, T, valid, topk), st.labels, valid

    kl_sum = torch.zeros((), dtype=acc, device=dev)
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    g_hs = torch.zeros((n_rows, hidden), dtype=acc, device=dev) if needs[0] else None
    g_W = torch.zeros((vocab, hidden), dtype=acc, device=dev) if needs[1] and len(chunks) == 1 else None  # one pass: summed over row blocks
    g_W_out = torch.empty_like(W) if needs[1] and len(chunks) > 1 else None  # two passes: written chunk by chunk
    g_b = torch.zeros(vocab, dtype=acc, device=dev) if needs[2] else None

    def add_grads(r0, r1, c0, c1, g, gW_chunk):
        if g_hs is not None:
            g_hs[r0:r1].addmm_(g, (W_acc if W_acc is not None else W)[c0:c1].to(acc))
        if gW_chunk is not None:
            gW_chunk.addmm_(g.T, hs[r0:r1].to(acc))
        if g_b is not None:
            g_b[c0:c1] += g.sum(0)

    def grad_tile(r0, r1, c0, c1, s, t, terms, lab, valid):
        ce_g = None if not has_ce else torch.where(valid, ce_w, torch.zeros_like(ce_w))[:, None]
        kl_row_g = None
        if kl == "dense":
            kl_row_g = torch.where(terms.has_t, kl_g, torch.zeros_like(kl_g))[:, None]
        elif kl == "topk":
            kl_row_g = kl_g
        ids = None if kl != "topk" else ids_all[r0:r1]
        return _tile_grad(s, c0, terms, T, kl_row_g, ce_g, lab, t, topk_mask(r0, r1, c0, c1), ids)

    saved = []
    one_pass = len(chunks) == 1
    for r0 in range(0, n_rows, R):
        r1 = min(r0 + R, n_rows)
        if one_pass and kl != "topk":  # whole rows: torch's fused log-sum-exps, the gradient formed in place
            lab = labels[r0:r1] if has_ce else None
            kl_rows, ce_rows, g = _whole_rows(student(r0, r1, 0, vocab), teacher_chunk(r0, r1, 0, vocab), T, lab, ignore_index,
                                              kl_g, ce_w, want_grad)  # fmt: skip
            if kl_rows is not None:
                kl_sum += kl_rows.sum()
            if ce_rows is not None:
                ce_sum += ce_rows.sum()
            if g is not None:
                add_grads(r0, r1, 0, vocab, g, g_W)
                del g
            continue
        tile = (student(r0, r1, 0, vocab), teacher_chunk(r0, r1, 0, vocab)) if one_pass else None
        terms, lab, valid = row_terms(r0, r1, tile)
        if terms.kl_rows is not None:
            kl_sum += terms.kl_rows.sum()
        if terms.ce_rows is not None:
            ce_sum += terms.ce_rows.sum()
        if want_grad:
            if one_pass:
                g = grad_tile(r0, r1, 0, vocab, *tile, terms, lab, valid)
                del tile
                add_grads(r0, r1, 0, vocab, g, g_W)
                del g
            else:
                saved.append((r0, r1, terms, lab, valid))
    if want_grad and not one_pass:  # pass 2, vocabulary outer: each chunk's ∂W is finished before the next
        for c0, c1 in chunks:
            gW_chunk = torch.zeros((c1 - c0, hidden), dtype=acc, device=dev) if needs[1] else None
            for r0, r1, terms, lab, valid in saved:
                g = grad_tile(r0, r1, c0, c1, student(r0, r1, c0, c1), teacher_chunk(r0, r1, c0, c1), terms, lab, valid)
                add_grads(r0, r1, c0, c1, g, gW_chunk)
                del g
            if gW_chunk is not None:
                g_W_out[c0:c1] = gW_chunk
    if one_pass and g_W is not None:
        g_W_out = g_W.to(W.dtype)  # no copy when W is in the accumulation dtype
    loss = kl_sum * kl_w if kl_w is not None else torch.zeros((), dtype=acc, device=dev)
    if ce_w is not None:
        loss = loss + ce_sum * ce_w
    grads = (
        None if g_hs is None else g_hs.to(hs.dtype),
        g_W_out,
        None if g_b is None else g_b.to(b.dtype),
    )
    return loss.float() if acc == torch.float32 else loss, grads


class ChunkedHeadKD(torch.autograd.Function):
    """Loss and gradients in forward (`_chunked`); backward multiplies them by grad_output."""

    @staticmethod
    def forward(ctx, hs, W, b, teacher_tensors, topk, temperature, labels, alpha, ignore_index, reduction, divisors, blocks_):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        teacher = DenseHead(*teacher_tensors) if not topk else teacher_tensors
        loss, ctx.grads = _chunked(hs, W, b, teacher, temperature, labels, alpha, ignore_index, reduction, divisors, needs, *blocks_)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("head_kd_loss: backward ran twice; its stored gradient is consumed by the first")
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else (g if _is_one(grad_output) else g.mul_(grad_output.to(g.dtype))) for g in grads]
        return (*scaled, None, None, None, None, None, None, None, None, None)


def _is_one(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() == 1 and x.item() == 1.0


def _check(hs, W, b, teacher, temperature, labels, alpha, ignore_index, reduction, divisors):
    check_kd_reduction(reduction, divisors)
    if reduction not in HEAD_KD_REDUCTIONS:
        raise ValueError(f"head_kd_loss reductions are {HEAD_KD_REDUCTIONS} (a per-row loss cannot be scaled once "
                         f"summed into ∂W), got {reduction!r}")
    if hs.dim() != 2 or W.dim() != 2 or hs.shape[1] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"hidden rows [N, H] and a decoder weight [V, H] with V > 0, got {tuple(hs.shape)} and {tuple(W.shape)}")
    if b is not None and b.shape != (W.shape[0],):
        raise ValueError(f"bias must be [V={W.shape[0]}], got {tuple(b.shape)}")
    if divisors is not None and divisors.shape != (2,):
        raise ValueError(f"divisors must be a [2] tensor, got {tuple(divisors.shape)}")
    if not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    n_rows, vocab = hs.shape[0], W.shape[0]
    if alpha != 0.0:
        if isinstance(teacher, DenseHead):
            h, w = teacher.hidden, teacher.weight
            if h.dim() != 2 or h.shape[0] != n_rows or w.shape != (vocab, h.shape[1]):
                raise ValueError(f"teacher head: rows [{n_rows}, Ht] and weight [{vocab}, Ht], got {tuple(h.shape)} and {tuple(w.shape)}")
            if teacher.bias is not None and teacher.bias.shape != (vocab,):
                raise ValueError(f"teacher bias must be [V={vocab}], got {tuple(teacher.bias.shape)}")
        elif _is_topk(teacher):
            if teacher.temperature != temperature:
                raise ValueError(f"top-k teacher logits hold the lse at T={teacher.temperature:g}, the loss runs at T={temperature:g}")
            if teacher.ids.shape != teacher.values.shape or teacher.ids.shape[0] != n_rows or teacher.lse.shape != (n_rows,):
                raise ValueError("top-k teacher: ids and values [N, k] and lse [N] for the N rows")
        else:
            raise TypeError(f"teacher must be a DenseHead or a TopkLogits, got {type(teacher).__name__}")
    if alpha != 1.0:
        if labels is None:
            raise ValueError("labels are required when alpha < 1 (the CE term has weight 1 - alpha)")
        if labels.shape != (n_rows,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids of shape ({n_rows},), got {labels.dtype} {tuple(labels.shape)}")
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if labels.device.type == "cuda":
            torch._assert_async(~bad.any(), f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
        elif bad.any():
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {labels[bad][0].item()}")


def _is_topk(teacher) -> bool:
    return all(hasattr(teacher, a) for a in ("ids", "values", "lse", "temperature"))


def head_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    block_rows: int | None = None,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE(s, labels) with s = hidden @ weight.T + bias, never
    materialising s or t (see the module's docstring). `teacher`: a `DenseHead` or a `TopkLogits` (None
    with alpha = 0). Differentiable w.r.t. hidden, weight and bias; the teacher is a constant.

    impl: "auto" (the Triton kernels on CUDA with a dense teacher, else "chunked"), "chunked" (torch, any
    device), "triton" (`pkd_fast.kernels.mlm_head_kd`: dense teacher), "dense" (materialised logits and
    the eager reference: the baseline). `block_rows`/`vocab_chunk` override the chunked path's blocks.
    """
    alpha = float(alpha)
    _check(hidden, weight, bias, teacher, temperature, labels, alpha, ignore_index, reduction, divisors)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    topk = alpha != 0.0 and _is_topk(teacher)
    if impl == "auto":
        impl = "triton" if hidden.device.type == "cuda" and not topk else "chunked"
    if impl == "dense":
        from pkd_fast.losses import kd_loss_reference, topk_kd_loss_reference

        s = torch.nn.functional.linear(hidden, weight, bias)
        if topk:
            return topk_kd_loss_reference(s, teacher.ids, teacher.values, teacher.lse, temperature, labels, alpha, ignore_index, reduction, divisors)
        t = None if alpha == 0.0 else teacher.logits().detach()
        return kd_loss_reference(s, t, temperature, labels, alpha, ignore_index, reduction, divisors)
    if impl == "triton":
        if topk:
            raise ValueError("the Triton head KD kernels take a dense teacher; a top-k teacher runs impl='chunked'")
        from pkd_fast.kernels.mlm_head_kd import fused_head_kd_loss

        t = (None, None, None) if alpha == 0.0 else (teacher.hidden, teacher.weight, teacher.bias)
        return fused_head_kd_loss(hidden, weight, bias, *t, temperature, labels, alpha, ignore_index, reduction, divisors)
    if alpha == 0.0:
        tensors = (None, None, None)
    elif topk:
        tensors = (teacher.ids.detach(), teacher.values.detach(), teacher.lse.detach())
    else:
        tensors = (teacher.hidden.detach(), teacher.weight.detach(), None if teacher.bias is None else teacher.bias.detach())
    lab = None if alpha == 1.0 else labels
    div = None if divisors is None else divisors.detach()
    return ChunkedHeadKD.apply(hidden, weight, bias, tensors, topk, float(temperature), lab, alpha, int(ignore_index), reduction, div,
                               (block_rows, vocab_chunk))
