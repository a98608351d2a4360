"""Training losses, by name: `--loss ce` is the reference recipe; `--loss ce+0.5*dice` sums weighted terms.

A loss takes Bx2xSxS logits and BxSxS integer targets (1 = object) and returns a scalar. A new term is one
function here and one entry in LOSSES; `--loss` then accepts its name, and the tests run it (they are
parametrised over LOSSES).
"""

import re
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

_TERM = re.compile(r"^(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([a-z_][a-z0-9_]*)$")


def parse_loss(spec: str) -> list[tuple[float, str]]:
    """'ce', 'ce+dice', 'ce+0.5*dice' -> [(weight, name), ...]; ValueError for an unknown or repeated term, or a
    weight that is not a positive number."""
    terms = []
    for part in spec.split("+"):
        match = _TERM.match(part.strip())
        if not match:
            raise ValueError(f"cannot read the loss term {part.strip()!r}; expected NAME or WEIGHT*NAME, terms joined "
                             "by '+' (e.g. ce+0.5*dice)")
        weight, name = float(match.group(1) or 1), match.group(2)
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; expected names from {', '.join(LOSSES)}")
        if weight <= 0:
            raise ValueError(f"the weight of {name} must be positive (drop the term instead)")
        if name in {n for _, n in terms}:
            raise ValueError(f"{name} appears twice; give it once with its weight (e.g. 2*{name})")
        terms.append((weight, name))
    return terms


def build_loss(spec: str) -> Loss:
    """The loss of a --loss spec (parse_loss)."""
    terms = [(weight, LOSSES[name]) for weight, name in parse_loss(spec)]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]  # the term itself: the reference's cross-entropy is bit for bit F.cross_entropy
    return lambda logits, target: sum(weight * term(logits, target) for weight, term in terms)
