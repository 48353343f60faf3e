"""Specialist models (Hinton, Vinyals & Dean 2015, section 5), for any classifier.

1. :func:`confusable_clusters`: groups of classes the generalist confuses: k-means on the
   columns of the covariance matrix of its predicted distributions (classes predicted together
   have similar columns).
2. :func:`train_specialist`: a copy of the generalist whose output layer keeps the rows of its
   classes plus one *dustbin* class for all others, trained on data half of which comes from
   its classes (:func:`specialist_rows`); the dustbin logit is then raised by the log of the
   ratio by which the specialist's classes were oversampled (:func:`dustbin_correction`).
3. :func:`combine`: per example, the specialists whose classes meet the generalist's top-n
   classes are active; the combined distribution q minimizes
   ``KL(p_g || q) + sum_m KL(p_m || qbar_m)``, qbar_m being q coarsened to specialist m's
   classes plus one dustbin bin holding q's mass on all its other classes (the "bucket"
   coarsening of :func:`kdfast.sparse_distillation_loss`). Solved by gradient steps on q's
   logits, batched over examples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

COMBINE_STEPS = 50
COMBINE_LR = 1.0


# ----------------------------------------------------------------------------- clusters
def prediction_covariance(probs: torch.Tensor) -> torch.Tensor:
    """The ``(C, C)`` covariance (over examples) of the predicted distributions ``probs``
    ``(N, C)``, computed in float64."""
    if probs.dim() != 2 or probs.shape[0] < 2:
        raise ValueError(f"probs must be (N >= 2, C), got shape {tuple(probs.shape)}")
    p = probs.double()
    centred = p - p.mean(0, keepdim=True)
    return centred.T @ centred / (p.shape[0] - 1)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, iterations: int = 100
           ) -> torch.Tensor:
    """Lloyd's k-means with k-means++ starts: the cluster id in [0, k) of each row of
    ``points`` ``(n, d)``; the best of ``restarts`` runs (least within-cluster sum of squares).
    Deterministic for a seed; every cluster is non-empty when ``k <= n`` distinct points."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    x = points.double()
    gen = torch.Generator().manual_seed(seed)
    best, best_cost = None, math.inf
    for _ in range(restarts):
        centres = x[torch.randint(n, (1,), generator=gen)]
        for _ in range(1, k):  # k-means++: next centre drawn in proportion to squared distance
            d2 = torch.cdist(x, centres).min(1).values ** 2
            pick = (torch.multinomial(d2, 1, generator=gen) if d2.sum() > 0
                    else torch.randint(n, (1,), generator=gen))
            centres = torch.cat([centres, x[pick]])
        for _ in range(iterations):
            assign = torch.cdist(x, centres).argmin(1)
            new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j]
                               for j in range(k)])
            if torch.equal(new, centres):
                break
            centres = new
        cost = float(((x - centres[assign]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = assign, cost
    return best


def confusable_clusters(probs: torch.Tensor, n_clusters: int, seed: int = 0, min_size: int = 2,
                        keep_diagonal: bool = False) -> list[list[int]]:
    """Disjoint groups of classes that the generalist confuses: k-means (``n_clusters``) on the
    columns of :func:`prediction_covariance` of its predicted distributions ``probs`` ``(N, C)``
    (the paper's method). Clusters smaller than ``min_size`` are dropped (a specialist for one
    class adds little); each cluster is a sorted class list, clusters sorted by first class.

    ``keep_diagonal=False`` (default) zeroes the diagonal first: a column's own entry is its
    class's prediction variance, which with few classes is 5-10 times every covariance and
    varies with how confident the generalist is on that class, so k-means on whole columns
    groups classes by confidence, not by confusion (measured on Fashion-MNIST: see the README).
    ``True`` clusters the whole columns, as the paper (15,000 classes) describes.
    """
    cov = prediction_covariance(probs)
    if not keep_diagonal:
        cov = cov - torch.diag(cov.diagonal())
    assign = kmeans(cov.T, n_clusters, seed=seed)
    clusters = [sorted(torch.nonzero(assign == j).flatten().tolist()) for j in range(n_clusters)]
    return sorted((c for c in clusters if len(c) >= min_size), key=lambda c: c[0])


# --------------------------------------------------------------------------- specialists
def specialist_rows(labels: torch.Tensor, classes: Sequence[int], seed: int = 0
                    ) -> tuple[torch.Tensor, float, float]:
    """The training rows of a specialist: every row whose label is in ``classes`` and as many
    rows drawn at random (without replacement) from the other classes, so half the data comes
    from its classes (all other rows if there are fewer). Returns ``(rows, natural fraction
    of its classes, trained fraction)``."""
    special = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
    inside, outside = torch.nonzero(special).flatten(), torch.nonzero(~special).flatten()
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError(f"classes {list(classes)} must hold some but not all rows "
                         f"({len(inside)} of {len(labels)} do)")
    gen = torch.Generator().manual_seed(seed)
    drawn = outside[torch.randperm(len(outside), generator=gen)[: len(inside)]]
    rows = torch.cat([inside, drawn]).sort().values
    return rows, len(inside) / len(labels), len(inside) / len(rows)


def dustbin_correction(natural_fraction: float, trained_fraction: float) -> float:
    """The log of the ratio by which a specialist's classes were oversampled: the odds of
    "one of its classes" against "dustbin" in its training data over those in the natural
    data. Adding it to the dustbin logit turns the trained posterior into the natural one
    (Bayes: each class's logit moves by the log of its prior ratio)."""
    for name, f in (("natural_fraction", natural_fraction), ("trained_fraction", trained_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {f}")
    odds = lambda f: f / (1.0 - f)  # noqa: E731
    return math.log(odds(trained_fraction) / odds(natural_fraction))


def specialist_labels(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Labels in a specialist's output space: position of the class in ``classes``, and
    ``len(classes)`` (the dustbin) for every other class."""
    lookup = torch.full((int(labels.max()) + 1 if len(labels) else 1,), len(classes), dtype=torch.long)
    known = torch.as_tensor([c for c in classes if c < len(lookup)], dtype=torch.long)
    lookup[known] = torch.as_tensor([i for i, c in enumerate(classes) if c < len(lookup)], dtype=torch.long)
    return lookup[labels]


def _output_layer(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the generalist needs an nn.Linear output layer (its last nn.Linear)")
    return layers[-1]


def init_from_generalist(generalist: nn.Module, classes: Sequence[int]) -> nn.Module:
    """A copy of ``generalist`` whose output layer (its last ``nn.Linear``) has the rows of
    ``classes`` plus a dustbin row: the mean of the other classes' rows, its bias raised by
    log(number of other classes), so the dustbin starts near the log of their summed mass."""
    model = copy.deepcopy(generalist)
    head = _output_layer(model)
    c = head.out_features
    keep = torch.as_tensor(list(classes), dtype=torch.long)
    if len(keep) == 0 or len(set(keep.tolist())) != len(keep) or keep.min() < 0 or keep.max() >= c:
        raise ValueError(f"classes must be distinct ids in [0, {c}), got {list(classes)}")
    rest = torch.as_tensor([j for j in range(c) if j not in set(keep.tolist())], dtype=torch.long)
    if len(rest) == 0:
        raise ValueError("a specialist's classes must leave some classes for the dustbin")
    with torch.no_grad():
        weight = torch.cat([head.weight[keep], head.weight[rest].mean(0, keepdim=True)])
        new = nn.Linear(head.in_features, len(keep) + 1, bias=head.bias is not None)
        new.weight.copy_(weight)
        if head.bias is not None:
            new.bias.copy_(torch.cat([head.bias[keep], head.bias[rest].mean(0, keepdim=True)
                                      + math.log(len(rest))]))
    parent, name = _parent_of(model, head)
    setattr(parent, name, new)
    return model


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is target:
                return parent, name
    raise ValueError("output layer not found")


@dataclass
class Specialist:
    """A trained specialist: ``model`` outputs ``len(classes) + 1`` logits (dustbin last);
    ``correction`` (:func:`dustbin_correction`) is added to the dustbin logit by
    :meth:`log_probs`."""

    classes: list[int]
    model: nn.Module
    correction: float

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, len(classes) + 1)`` corrected log-probabilities (eval mode)."""
        was = self.model.training
        self.model.eval()
        try:
            logits = self.model(x).double()
        finally:
            self.model.train(was)
        logits[:, -1] += self.correction
        return torch.log_softmax(logits, dim=-1)


def train_specialist(generalist: nn.Module, classes: Sequence[int], train_data: TensorDataset, config,
                     seed: int = 0, eval_data: Dataset | None = None, progress: bool = False) -> Specialist:
    """Trains one specialist for ``classes`` from the generalist's weights on hard labels
    (cross-entropy, :func:`kdfast.train.fit` with ``config``), on :func:`specialist_rows` of
    ``train_data`` ``(inputs, labels)``; returns it with its dustbin correction."""
    from kdfast.train import fit

    x, y = train_data.tensors[:2]
    rows, natural, trained = specialist_rows(y, classes, seed)
    torch.manual_seed(seed)
    model = init_from_generalist(generalist, classes)
    data = TensorDataset(x[rows], specialist_labels(y[rows], classes))
    evaluation = None
    if eval_data is not None:
        ex, ey = eval_data.tensors[:2]
        evaluation = TensorDataset(ex, specialist_labels(ey, classes))
    fit(model, data, config=config, eval_data=evaluation, progress=progress,
        name="specialist " + "-".join(map(str, classes)))
    return Specialist(list(classes), model, dustbin_correction(natural, trained))


# --------------------------------------------------------------------------- inference
def active_specialists(generalist_probs: torch.Tensor, clusters: Sequence[Sequence[int]], top_n: int
                       ) -> torch.Tensor:
    """``(N, M)`` bool: specialist m is active for example i when one of its classes is among
    the generalist's ``top_n`` classes for i."""
    c = generalist_probs.shape[-1]
    top = generalist_probs.topk(min(top_n, c), dim=-1).indices
    in_top = torch.zeros_like(generalist_probs, dtype=torch.bool).scatter_(1, top, True)
    return torch.stack([in_top[:, list(cl)].any(1) for cl in clusters], dim=1) if clusters else \
        torch.zeros(len(generalist_probs), 0, dtype=torch.bool)


def _bins(classes: Sequence[int], num_classes: int, dtype) -> torch.Tensor:
    """``(C, len(classes) + 1)`` 0/1 map of each class to its bin (its own, or the dustbin)."""
    onto = specialist_labels(torch.arange(num_classes), classes)
    return nn.functional.one_hot(onto, len(classes) + 1).to(dtype)


def combine_objective(log_q: torch.Tensor, generalist_log_probs: torch.Tensor,
                      specialist_log_probs: Sequence[torch.Tensor], clusters: Sequence[Sequence[int]],
                      active: torch.Tensor) -> torch.Tensor:
    """Per example: ``KL(p_g || q) + sum over active m of KL(p_m || qbar_m)`` (``(N,)``)."""
    c = log_q.shape[-1]
    p_g = generalist_log_probs.exp()
    total = (p_g * (generalist_log_probs - log_q)).sum(-1)
    for m, (log_p, classes) in enumerate(zip(specialist_log_probs, clusters, strict=True)):
        log_qbar = torch.log(log_q.exp() @ _bins(classes, c, log_q.dtype))
        kl = (log_p.exp() * (log_p - log_qbar)).sum(-1)
        total = total + torch.where(active[:, m], kl, torch.zeros_like(kl))
    return total


def combine(generalist_log_probs: torch.Tensor, specialist_log_probs: Sequence[torch.Tensor],
            clusters: Sequence[Sequence[int]], active: torch.Tensor, steps: int = COMBINE_STEPS,
            lr: float = COMBINE_LR) -> torch.Tensor:
    """The combined log-distribution ``(N, C)``: argmin over q of :func:`combine_objective`.

    ``steps`` steps on q's logits z (start: the generalist's log-probabilities), batched over
    the examples. With A active specialists the gradient is ``dL/dz = (1 + A) q - r``,
    ``r_k = p_g,k + sum_m P_m[b(k)] q_k / Qbar_m[b(k)]`` (b(k): k's bin in specialist m). A plain
    step moves a class's logit in proportion to its probability q_k, so unlikely classes barely
    move (300 steps still left KL gaps of 1e-2 in the tests' problems); each step here divides
    the gradient by ``(1 + A) q`` in log form: ``z += lr * (log r - log((1 + A) q))``. At lr = 1
    that is the EM (majorize-minimize) update of this objective, which is convex in q, decreases
    it monotonically and stops only at the optimum: 50 steps reach the float64 optimum to
    ~1e-10 in the objective on random disagreeing specialists (``tests/test_specialists.py``).
    Rows without an active specialist return p_g exactly.
    """
    if active.shape != (generalist_log_probs.shape[0], len(clusters)):
        raise ValueError(f"active must be (N, M) = ({generalist_log_probs.shape[0]}, {len(clusters)}), "
                         f"got {tuple(active.shape)}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    c = generalist_log_probs.shape[-1]
    p_g = generalist_log_probs.exp()
    bins = [_bins(cl, c, p_g.dtype) for cl in clusters]
    weights = [a.to(p_g.dtype)[:, None] for a in active.unbind(1)]
    tiny = torch.finfo(p_g.dtype).tiny
    log_total = torch.log1p(active.sum(1, keepdim=True).to(p_g.dtype))  # log(1 + A)
    z = generalist_log_probs.clone()
    for _ in range(steps):
        q = torch.softmax(z, dim=-1)
        r = p_g.clone()
        for w, b, log_p in zip(weights, bins, specialist_log_probs, strict=True):
            share = log_p.exp() / (q @ b).clamp_min(tiny)
            r = r + w * q * (share @ b.T)
        z = z + lr * (torch.log(r.clamp_min(tiny)) - log_total - torch.log_softmax(z, dim=-1))
    return torch.log_softmax(z, dim=-1)
