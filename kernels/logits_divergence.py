"""Fused full-vocabulary divergences from logits: the per-row loss and d loss / d student logits.

Reference: `draftdistill.losses.divergences` (the `*_from_log_probs` math and the public fkl, rkl,
jsd, tvd, skew_fkl, skew_rkl, neg_log_acceptance, lk). tests/kernels compares values and
gradients with it.

One program per row, tiles of BLOCK over the vocabulary, all math in float32 whatever the input
dtype. With z = x / T (student) and w = t / T (teacher), log q = z - lse(z), log p = w - lse(w):

  stats kernel, pass 1  online max / sum-exp of z and w            -> lse_q, lse_p
  stats kernel, pass 2  the row sums the gradient needs first:      L = sum_v l_v,
                        G = sum_v g_v with g_v = dL / d log q_v
  host, length-N only   row coefficients: NLA's 1/alpha, LK's lambda (per row or batch mean),
                        the reduction's scale
  grad kernel           dL/dx_v = scale / T * (c1 g1_v + c2 g2_v - q_v G)
                        (the log-softmax Jacobian; g2 is LK's second term)

FKL skips pass 2: its G = -sum of p over finite student entries falls out of pass 1, and the grad
kernel sums the loss as it goes, so the logits are read twice instead of three times. Nothing of
size N x V is allocated except the gradient, which has the student's dtype (as the reference's
autograd gives it) and may overwrite the student logits (`out=`, used by the fused linear loss).

Exact reference details kept: -inf logits have log-prob LOG_ZERO (-1e4) and pass no gradient
through their own entry; masked rows give loss 0 and gradient 0 and are never read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from draftdistill.losses.teacher import LOG_ZERO, TeacherLogProbs

from ._common import launch_config

# Elementary divergences the kernels know; a public divergence is one or two of them.
FKL, RKL, JSD, TVD, SKEW_FKL, SKEW_RKL, NONE = 0, 1, 2, 3, 4, 5, -1
_LOG_ZERO = tl.constexpr(LOG_ZERO)  # log 0 stand-in, as the reference's finite_log
STATS = 8  # floats per row: lse_q, lse_p, -G_fkl, L1, G1, L2, G2, unused
# Which divergences use this kernel is the registry's business (Divergence.kernel); here is only
# how each is built from the elementary ones (_kinds, kind_pairs).


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _terms(lq, lp, KIND: tl.constexpr, w, log_w, log_1mw):
    """Per entry: the loss term l_v and g_v = d l_v / d log q_v of one elementary divergence.
    w is JSD's beta or the skew alpha; log_w, log_1mw its logs (precomputed on the host)."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if KIND == 0:  # KL(p || q)
        l = p * (lp - lq)
        g = -p
    elif KIND == 1:  # KL(q || p)
        l = q * (lq - lp)
        g = l + q
    elif KIND == 2:  # beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        gq = q * (lq - lm)
        l = w * p * (lp - lm) + (1.0 - w) * gq
        g = (1.0 - w) * gq  # the d log m terms cancel
    elif KIND == 3:  # 0.5 |p - q|; sign(0) = 0 as torch's abs backward
        d = q - p
        l = 0.5 * tl.abs(d)
        g = tl.where(d > 0, 0.5 * q, tl.where(d < 0, -0.5 * q, 0.0))
    elif KIND == 4:  # KL(p || alpha p + (1-alpha) q)
        lmix = _logaddexp(lp + log_w, lq + log_1mw)
        l = p * (lp - lmix)
        g = -(1.0 - w) * p * tl.exp(lq - lmix)
    else:  # KL(q || alpha q + (1-alpha) p)
        lmix = _logaddexp(lq + log_w, lp + log_1mw)
        l = q * (lq - lmix)
        g = l + q - w * q * tl.exp(lq - lmix)
    return l, g


@triton.jit
def _tile(x_row, t_row, offs, V, inv_T, lse_q, lse_p):
    """log q, log p of one tile (LOG_ZERO for -inf logits and for lanes past V), and which
    student entries are finite (only those pass gradient)."""
    inb = offs < V
    z = tl.load(x_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
    w = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
    z_fin = z != float("-inf")
    lq = tl.where(z_fin, z - lse_q, _LOG_ZERO)
    lp = tl.where(w != float("-inf"), w - lse_p, _LOG_ZERO)
    return lq, lp, z_fin & inb, inb


@triton.jit
def _stats_kernel(x_ptr, t_ptr, keep_ptr, stats_ptr, V, x_stride, t_stride, inv_T,
                  w, log_w, log_1mw, KIND1: tl.constexpr, KIND2: tl.constexpr,
                  SUMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(keep_ptr + row) != 0:
        x_row = x_ptr + row * x_stride
        t_row = t_ptr + row * t_stride
        # Pass 1: online softmax normalisers; a running max that is still -inf is replaced by
        # 0 so that exp(-inf - -inf) never appears.
        m_q = tl.full((), float("-inf"), tl.float32)
        m_p = tl.full((), float("-inf"), tl.float32)
        s_q = tl.zeros((), tl.float32)
        s_p = tl.zeros((), tl.float32)
        s_pf = tl.zeros((), tl.float32)  # teacher mass where the student is finite (FKL's G)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            z = tl.load(x_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
            wt = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
            new_q = tl.maximum(m_q, tl.max(z, 0))
            safe_q = tl.where(new_q == float("-inf"), 0.0, new_q)
            s_q = s_q * tl.exp(m_q - safe_q) + tl.sum(tl.exp(z - safe_q), 0)
            m_q = new_q
            new_p = tl.maximum(m_p, tl.max(wt, 0))
            safe_p = tl.where(new_p == float("-inf"), 0.0, new_p)
            e_p = tl.exp(wt - safe_p)
            f_p = tl.exp(m_p - safe_p)
            s_p = s_p * f_p + tl.sum(e_p, 0)
            s_pf = s_pf * f_p + tl.sum(tl.where(z != float("-inf"), e_p, 0.0), 0)
            m_p = new_p
        lse_q = m_q + tl.log(s_q)
        lse_p = m_p + tl.log(s_p)
        out = stats_ptr + row * 8
        tl.store(out + 0, lse_q)
        tl.store(out + 1, lse_p)
        tl.store(out + 2, s_pf / s_p)
        if SUMS:
            # Pass 2: row sums, accumulated per lane and reduced once at the end.
            l1 = tl.zeros([BLOCK], tl.float32)
            g1 = tl.zeros([BLOCK], tl.float32)
            l2 = tl.zeros([BLOCK], tl.float32)
            g2 = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                lq, lp, gmask, inb = _tile(x_row, t_row, offs, V, inv_T, lse_q, lse_p)
                l, g = _terms(lq, lp, KIND1, w, log_w, log_1mw)
                l1 += tl.where(inb, l, 0.0)
                g1 += tl.where(gmask, g, 0.0)
                if KIND2 >= 0:
                    l, g = _terms(lq, lp, KIND2, w, log_w, log_1mw)
                    l2 += tl.where(inb, l, 0.0)
                    g2 += tl.where(gmask, g, 0.0)
            tl.store(out + 3, tl.sum(l1, 0))
            tl.store(out + 4, tl.sum(g1, 0))
            tl.store(out + 5, tl.sum(l2, 0))
            tl.store(out + 6, tl.sum(g2, 0))


@triton.jit
def _grad_kernel(x_ptr, t_ptr, keep_ptr, stats_ptr, coef_ptr, grad_ptr, loss_ptr, V,
                 x_stride, t_stride, g_stride, inv_T, w, log_w, log_1mw,
                 KIND1: tl.constexpr, KIND2: tl.constexpr, LOSS: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g_row = grad_ptr + row * g_stride
    if tl.load(keep_ptr + row) != 0:
        x_row = x_ptr + row * x_stride
        t_row = t_ptr + row * t_stride
        lse_q = tl.load(stats_ptr + row * 8)
        lse_p = tl.load(stats_ptr + row * 8 + 1)
        c1 = tl.load(coef_ptr + row * 4)
        c2 = tl.load(coef_ptr + row * 4 + 1)
        G = tl.load(coef_ptr + row * 4 + 2)
        scale = tl.load(coef_ptr + row * 4 + 3)  # reduction scale / T
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            lq, lp, gmask, inb = _tile(x_row, t_row, offs, V, inv_T, lse_q, lse_p)
            l, g = _terms(lq, lp, KIND1, w, log_w, log_1mw)
            g = c1 * g
            if KIND2 >= 0:
                _, g_b = _terms(lq, lp, KIND2, w, log_w, log_1mw)
                g += c2 * g_b
            g = tl.where(gmask, g, 0.0)
            grad = scale * (g - tl.exp(lq) * G)
            # Same program, same offsets: reading x and then writing grad is safe in place.
            tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)
            if LOSS:
                acc += tl.where(inb, l, 0.0)
        if LOSS:
            tl.store(loss_ptr + row, tl.sum(acc, 0))
    else:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], tl.float32)
            tl.store(g_row + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < V)


_PLAIN = {"fkl": (FKL, NONE), "rkl": (RKL, NONE), "tvd": (TVD, NONE),
          "neg_log_acceptance": (TVD, NONE), "lk": (FKL, TVD)}


def _kinds(name: str, params: dict) -> tuple[int, int, float]:
    """(first, second elementary divergence, their parameter w) for a public divergence; the
    end points the reference special-cases (jsd beta 0 / 1, skew alpha 0) are plain KLs."""
    if name == "jsd":
        beta = params["beta"]
        return (FKL, NONE, 0.0) if beta == 0.0 else (RKL, NONE, 0.0) if beta == 1.0 \
            else (JSD, NONE, beta)
    if name in ("skew_fkl", "skew_rkl"):
        alpha, fwd = params["alpha"], name == "skew_fkl"
        if alpha == 0.0:
            return (FKL if fwd else RKL), NONE, 0.0
        return (SKEW_FKL if fwd else SKEW_RKL), NONE, alpha
    if name not in _PLAIN:
        raise ValueError(f"divergence {name!r} names the logits_divergence kernel, which does not "
                         f"implement it (it knows {', '.join(['jsd', 'skew_fkl', 'skew_rkl', *_PLAIN])})")
    return (*_PLAIN[name], 0.0)


def kind_pairs(name: str) -> list[tuple[int, int]]:
    """Every (KIND1, KIND2) a launch for `name` may use, whatever its parameters."""
    ends = {"jsd": [{"beta": 0.0}, {"beta": 1.0}, {"beta": 0.5}],
            "skew_fkl": [{"alpha": 0.0}, {"alpha": 0.5}], "skew_rkl": [{"alpha": 0.0}, {"alpha": 0.5}]}
    return [_kinds(name, params)[:2] for params in ends.get(name, [{}])]


def compile_variants(names, dtype: str, BLOCK: int):
    """(label, kernel, signature, constexprs) of every launch the divergences `names` may make
    with `dtype` logits (kernels/compile_check.py compiles them)."""
    pairs = sorted({pair for name in names for pair in kind_pairs(name)})
    params = {"w": "fp32", "log_w": "fp32", "log_1mw": "fp32"}
    for k1, k2 in pairs:
        sig = {"x_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "keep_ptr": "*i8", "stats_ptr": "*fp32",
               "V": "i32", "x_stride": "i64", "t_stride": "i64", "inv_T": "fp32", **params,
               "KIND1": "constexpr", "KIND2": "constexpr", "SUMS": "constexpr",
               "BLOCK": "constexpr"}
        for sums in (True, False):
            yield (f"stats {dtype} kinds={k1},{k2} sums={sums}", _stats_kernel, sig,
                   {"KIND1": k1, "KIND2": k2, "SUMS": sums, "BLOCK": BLOCK})
        sig = {"x_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "keep_ptr": "*i8", "stats_ptr": "*fp32",
               "coef_ptr": "*fp32", "grad_ptr": f"*{dtype}", "loss_ptr": "*fp32", "V": "i32",
               "x_stride": "i64", "t_stride": "i64", "g_stride": "i64", "inv_T": "fp32",
               **params, "KIND1": "constexpr", "KIND2": "constexpr", "LOSS": "constexpr",
               "BLOCK": "constexpr"}
        for loss in (True, False):
            yield (f"grad {dtype} kinds={k1},{k2} loss={loss}", _grad_kernel, sig,
                   {"KIND1": k1, "KIND2": k2, "LOSS": loss, "BLOCK": BLOCK})


def supports(shape: torch.Size, teacher, params: dict) -> bool:
    """Logits or TeacherLogProbs of the student's shape; anything else goes to the reference."""
    t = teacher.logprobs if isinstance(teacher, TeacherLogProbs) else teacher
    return isinstance(t, Tensor) and t.shape == shape


def _row_terms(name: str, params: dict, st: Tensor, keep: Tensor):
    """(loss, c1, c2, G) per row from the stats, in float32; the same formulas as the reference
    on the row sums (L1, G1) and, for LK, (L2, G2) = TVD's."""
    L1, G1, L2, G2 = st[:, 3], st[:, 4], st[:, 5], st[:, 6]
    one, zero = torch.ones_like(L1), torch.zeros_like(L1)
    if name == "neg_log_acceptance":
        eps = params["eps"]
        loss = -torch.log1p(-L1.clamp(max=1 - eps))
        d = torch.where(L1 <= 1 - eps, 1.0 / (1.0 - L1), 0.0)  # clamp passes grad at the bound
        return loss, d, zero, d * G1
    if name == "lk":
        alpha = (1 - L2).clamp(0, 1)
        if params["batch_alpha"]:
            alpha = torch.where(keep, alpha, 0.0).sum() / keep.sum().clamp_min(1)
        lam = torch.exp(-params["eta"] * alpha).expand_as(L1)
        return lam * L1 + (1 - lam) * L2, lam, 1 - lam, lam * G1 + (1 - lam) * G2
    return L1, one, zero, G1


def loss_and_grad(name: str, x: Tensor, teacher, keep: Tensor, temperature: float,
                  params: dict, scale: Tensor | float, need_grad: bool, *,
                  out: Tensor | None = None, block_size: int | None = None):
    """Per-row loss [N] (float32, 0 on masked rows) and, if need_grad, scale * dL/dx [N, V].

    x: student logits [N, V] (unit stride along V); teacher: logits or TeacherLogProbs [N, V]
    (re-tempered like logits, as the reference does); keep: bool [N]; out: where to write the
    gradient (may be x itself).
    """
    t = teacher.logprobs if isinstance(teacher, TeacherLogProbs) else teacher
    N, V = x.shape
    t = t if t.stride(-1) == 1 else t.contiguous()
    k1, k2, w = _kinds(name, params)
    log_w = math.log(w) if w > 0 else 0.0
    log_1mw = math.log1p(-w)
    BLOCK, warps = launch_config(V, block_size)
    inv_T = 1.0 / temperature
    keep_i = keep.to(torch.int8).contiguous()
    st = torch.zeros(N, STATS, dtype=torch.float32, device=x.device)
    two_pass = need_grad and k1 == FKL and k2 == NONE  # fkl, jsd beta=0, skew_fkl alpha=0
    common = dict(w=w, log_w=log_w, log_1mw=log_1mw, KIND1=k1, KIND2=k2, BLOCK=BLOCK,
                  num_warps=warps)
    _stats_kernel[(N,)](x, t, keep_i, st, V, x.stride(0), t.stride(0), inv_T,
                        SUMS=not two_pass, **common)
    if two_pass:  # FKL: c1 = 1, G = -(teacher mass where the student is finite)
        loss = torch.zeros(N, dtype=torch.float32, device=x.device)
        c1, c2, G = torch.ones_like(loss), torch.zeros_like(loss), -st[:, 2]
    else:
        loss, c1, c2, G = _row_terms(name, params, st, keep)
        loss = torch.where(keep, loss, 0.0)
    if not need_grad:
        return loss, None
    coef = torch.stack([c1, c2, G, (scale * inv_T) * torch.ones_like(c1)], dim=1).contiguous()
    grad = torch.empty_like(x) if out is None else out
    _grad_kernel[(N,)](x, t, keep_i, st, coef, grad, loss, V, x.stride(0), t.stride(0),
                       grad.stride(0), inv_T, LOSS=two_pass, **common)
    return loss, grad
