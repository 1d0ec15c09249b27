"""The probe and training losses beside cross-entropy: the supervised contrastive loss (GPS
paper §3.1) and the choice of probe loss per task kind (ARCHITECTURE.md §3c)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zest.errors import InvalidInputError

SUPCON_TEMPERATURE = 0.07


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor,
                                temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; GPS paper §3.1, Eq. 2).

    ``L = mean_i  -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )`` on
    L2-normalised features ``z``; anchors without a positive are skipped.
    """
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    z = F.normalize(features, dim=1)
    n = z.shape[0]
    if n < 2:
        raise InvalidInputError(f"supcon needs a batch of at least 2 examples, got {n}; "
                                "raise batch_size or use probe_loss='ce'",
                                parameter=("batch_size", "probe_loss"))
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        # no two examples share a class: fall back to zero loss that still has a graph
        return (z.sum() * 0.0)
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


SUPCON_LM_MESSAGE = ("probe_loss='supcon' contrasts class labels; a causal-LM task (lm:<data "
                     "set>) probes with its next-token loss: pass probe_loss='ce' or omit it")


def probe_loss_for(kind: str, requested: str | None, default: str = "supcon") -> str:
    """The probe loss of a task kind: ``requested``, else ``default`` (e.g. the predictor's);
    a causal-LM task always probes with its next-token cross-entropy (``ce``) and refuses
    ``supcon``, which needs class labels to contrast."""
    if kind != "causal_lm":
        return requested or default
    if requested == "supcon":
        raise InvalidInputError(SUPCON_LM_MESSAGE, parameter="probe_loss")
    if requested not in (None, "ce"):
        raise InvalidInputError(f"unknown probe loss {requested!r}; a causal-LM task probes "
                                "with 'ce' (its next-token loss)")
    return "ce"
