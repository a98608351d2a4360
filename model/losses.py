"""Training losses, by name: `--loss ce` is the reference recipe; `--loss ce+dice` sums two terms.

A loss takes Bx2xSxS logits and BxSxS integer targets (1 = object) and returns a scalar. A new term is one
function here and one entry in LOSSES; `--loss` then accepts its name.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference: two-class cross-entropy, mean over pixels, in float32 even under autocast."""
    return F.cross_entropy(logits.float(), target)


def dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the object probability against the mask, per image, averaged over the batch."""
    prob = logits.float().softmax(dim=1)[:, 1]
    target = target.float()
    overlap = (prob * target).sum(dim=(1, 2))
    total = prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    return (1 - (2 * overlap + eps) / (total + eps)).mean()


LOSSES: dict[str, Loss] = {"ce": cross_entropy, "dice": dice}


def build_loss(spec: str) -> Loss:
    """'ce', 'dice' or a sum such as 'ce+dice'; ValueError naming an unknown term."""
    names = [n.strip() for n in spec.split("+")]
    if unknown := [n for n in names if n not in LOSSES]:
        raise ValueError(f"unknown loss {unknown[0]!r}; expected names from {', '.join(LOSSES)} joined by '+'")
    terms = [LOSSES[n] for n in names]
    if len(terms) == 1:
        return terms[0]
    return lambda logits, target: sum(term(logits, target) for term in terms)
