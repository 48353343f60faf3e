"""`kdfast bench`: kdfast vs the eager PyTorch loss and its torch.compile'd version, side by
side, with the machine's own bandwidth and exp rate as the roofline."""

from kdfast.bench.report import run_report

__all__ = ["run_report"]
