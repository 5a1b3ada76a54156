"""The inference-time hubness corrections (docs/corrections.md): each one rescores a row block
of test-query x test-gallery similarities, as the ``rescore`` hook of the scoring engine
(:func:`nbretr.scoring.stream`), from per-gallery statistics over a bank
(:func:`nbretr.scoring.bank_stats`) or over the test queries (:func:`nbretr.scoring.column_lse`).
Row top-1s and top-k values come from :func:`nbretr.ops.topk_rank` (ties: lower index).
"""
from __future__ import annotations

import torch

from nbretr import ops
from nbretr.scoring import BankStats

__all__ = ["inverted_softmax", "dynamic_inverted_softmax", "qb_norm", "db_norm", "nnn", "csls", "dual_softmax",
           "DBNORM_BETA1", "DBNORM_BETA2", "DSL_TEMPERATURE"]


def _top1(block: torch.Tensor) -> torch.Tensor:
    """[q] every row's best column (ties: the lower index)."""
    return ops.topk_rank(block, 1)[1][:, 0]


# -- the corrections ------------------------------------------------------------------------------
# Every function takes a row block ``s [q, G]`` of test-query x test-gallery similarities and
# returns scores that rank each row the way the correction ranks it (log space where the method
# is a product of exponentials: the ranking is the same). docs/corrections.md has the papers,
# the formulas, the defaults and the conventions.

def inverted_softmax(block: torch.Tensor, stats: BankStats, beta: float) -> torch.Tensor:
    """log of exp(beta s(q,g)) / sum_b exp(beta s(b,g)) (sum over the bank ``stats``)."""
    return (beta * block.double() - stats.lse[beta][None, :]).to(block.dtype)


def dynamic_inverted_softmax(block: torch.Tensor, stats: BankStats, beta: float, k: int) -> torch.Tensor:
    """QB-Norm's dynamic inverted softmax (Bogolin et al., CVPR 2022): rows whose top-1 gallery
    item (raw similarity, ties: lower index) is in the activation set -- the gallery items
    in the top-k of some bank row -- get the inverted softmax (log space); the other rows
    keep their similarities. Rows are ranked independently, so the two scales may mix."""
    top1 = _top1(block)
    use = stats.hits[k][top1]
    out = block.clone()
    out[use] = inverted_softmax(block[use], stats, beta)
    return out


def qb_norm(block: torch.Tensor, stats: BankStats, beta: float = 20.0, k: int = 1) -> torch.Tensor:
    """QB-Norm with the dynamic inverted softmax over the query bank ``stats`` (authors'
    defaults beta = 20, activation k = 1)."""
    return dynamic_inverted_softmax(block, stats, beta, k)


DBNORM_BETA1 = 1 / 1.99
DBNORM_BETA2 = 3.0


def db_norm(block: torch.Tensor, q_stats: BankStats, g_stats: BankStats, beta1: float = DBNORM_BETA1,
            beta2: float = DBNORM_BETA2, *, dynamic: bool = False, k: int = 1) -> torch.Tensor:
    """DBNorm (Wang et al., EMNLP 2023), log space. Dual inverted softmax::

        log [ exp(b1 s(q,g)) / sum_{q' in query bank} exp(b1 s(q',g)) ]
          + log [ exp(b2 s(q,g)) / sum_{g' in gallery bank} exp(b2 s(g',g)) ]

    ``q_stats``: the query bank's cross-modal similarities s(q', g) to the test gallery
    (``lse[beta1]``, ``hits[k]``); ``g_stats``: the gallery bank's same-modality
    similarities s(g', g) to the test gallery (``lse[beta2]``, ``hits[k]``).

    ``dynamic=True``: dual dynamic inverted softmax -- each factor is applied only to rows
    whose top-1 gallery item is in that bank's activation set (top-k of some bank row); a
    factor not applied is its numerator exp(b s(q,g)) (so a row with neither ranks by s)."""
    s = block.double()
    fq = beta1 * s - q_stats.lse[beta1][None, :]
    fg = beta2 * s - g_stats.lse[beta2][None, :]
    if dynamic:
        top1 = _top1(block)
        fq = torch.where(q_stats.hits[k][top1][:, None], fq, beta1 * s)
        fg = torch.where(g_stats.hits[k][top1][:, None], fg, beta2 * s)
    return (fq + fg).to(block.dtype)


def nnn(block: torch.Tensor, stats: BankStats, alpha: float = 0.75, k: int = 128) -> torch.Tensor:
    """NNN (Chowdhury et al., EMNLP 2024): s(q,g) - alpha * mean of the k largest s(b,g) over
    the query bank."""
    return block - alpha * stats.topk_mean[k][None, :]


def csls(block: torch.Tensor, stats: BankStats, k: int = 10) -> torch.Tensor:
    """CSLS (Conneau et al., ICLR 2018): 2 s(q,g) - r_G(q) - r_Q(g), r = mean similarity to
    the k nearest cross-modal items; r_G(q) over the test gallery (this block's row),
    r_Q(g) over the query bank (``stats``), not over the test queries."""
    r_g = ops.topk_rank(block, min(k, block.shape[1]))[0].mean(1, keepdim=True)
    return 2 * block - r_g - stats.topk_mean[k][None, :]


DSL_TEMPERATURE = 1000.0


def dual_softmax(block: torch.Tensor, col_lse: torch.Tensor, temperature: float = DSL_TEMPERATURE) -> torch.Tensor:
    """Dual softmax at inference (CAMoE, Cheng et al. 2021): s(q,g) * softmax over the test
    queries of s(., g) / temperature (CAMoE's convention: divide by the temperature).
    ``col_lse`` [G] = logsumexp over all test queries of s(q, g) / temperature
    (:func:`column_lse`). Float64, so that small factors do not underflow into ties."""
    s = block.double()
    return s * torch.exp(s / temperature - col_lse[None, :].to(s.device))
