"""The paper's MNIST models (ReLU MLPs) and the 2-pixel jitter the teacher trains on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _check_mlp_args(sizes: list[int], dropout: float, input_dropout: float) -> None:
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must be >= 2 positive widths (input ... classes), got {sizes}")
    for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def mlp(sizes: Sequence[int], dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Sequential:
    """A ReLU MLP ``sizes[0] -> ... -> sizes[-1]`` (logits, no softmax).

    Args:
        sizes: layer widths, input first, classes last, e.g. ``(784, 1200, 1200, 10)``.
        dropout: dropout probability after each hidden ReLU.
        input_dropout: dropout probability on the inputs.
    """
    sizes = [int(s) for s in sizes]
    _check_mlp_args(sizes, dropout, input_dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def mlp_spec(sizes: Sequence[int], dropout: float = 0.0, input_dropout: float = 0.0) -> dict:
    """The JSON-able spec of ``mlp(sizes, dropout, input_dropout)``, as stored in checkpoints:
    ``build_model(mlp_spec(...))`` builds that MLP (the CLI and the MNIST experiment both
    make their models this way, so a checkpoint can always rebuild them)."""
    sizes = [int(s) for s in sizes]
    _check_mlp_args(sizes, dropout, input_dropout)
    return {"arch": "mlp", "sizes": sizes, "dropout": dropout, "input_dropout": input_dropout}


def parse_sizes(text: str) -> list[int]:
    """``"784-800-800-10"`` -> ``[784, 800, 800, 10]`` (the CLI's model notation)."""
    try:
        sizes = [int(part) for part in text.split("-")]
    except ValueError:
        raise ValueError(f"layer sizes must look like 784-800-800-10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"layer sizes must be >= 2 positive ints like 784-800-800-10, got {text!r}")
    return sizes


def build_model(spec: dict) -> nn.Module:
    """Builds a model from a JSON-able spec, as stored in checkpoints:
    ``{"arch": "mlp", "sizes": [...], "dropout": p, "input_dropout": q}``."""
    if spec.get("arch") != "mlp":
        raise ValueError(f"model spec arch must be 'mlp', got {spec.get('arch')!r}")
    return mlp(spec["sizes"], spec.get("dropout", 0.0), spec.get("input_dropout", 0.0))


def jitter(x: torch.Tensor, generator: torch.Generator | None = None, *, max_shift: int = 2,
           side: int = 28) -> torch.Tensor:
    """Shifts each image by an independent random (dx, dy) in [-max_shift, max_shift]^2,
    filling with zeros: the translation jitter of the paper's teacher.

    Fits :func:`kdfast.train.fit`'s ``augment(x, generator)``. ``x`` is ``(B, side*side)``
    or ``(B, 1, side, side)``; the result has x's shape. One
    gather for the whole batch: the image is zero-padded and each output pixel reads its
    shifted source.
    """
    if max_shift == 0:
        return x
    shape = x.shape
    b = shape[0]
    img = x.reshape(b, side, side)
    padded = nn.functional.pad(img, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    ar = torch.arange(side)
    rows = (ar[None, :] + shifts[0][:, None])[:, :, None]  # (B, side, 1)
    cols = (ar[None, :] + shifts[1][:, None])[:, None, :]  # (B, 1, side)
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    return out.reshape(shape)
