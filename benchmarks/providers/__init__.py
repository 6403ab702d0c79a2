"""The implementations we compare, one module each, behind :class:`~benchmarks.providers.base.Provider`."""

from __future__ import annotations

from benchmarks.providers.base import MODES, Mode, Provider
from benchmarks.providers.cce import CutCrossEntropy
from benchmarks.providers.liger_dpo import LigerDPO
from benchmarks.providers.liger_flce import LigerFLCE
from benchmarks.providers.ours import Ours
from benchmarks.providers.torch_reference import TorchReference
from benchmarks.providers.trl_chunked import TRLChunked

#: In table order. ``ours`` and ``torch`` always run; the others skip with a reason when unavailable.
PROVIDERS: tuple[type[Provider], ...] = (
    Ours,
    TorchReference,
    TRLChunked,
    LigerDPO,
    LigerFLCE,
    CutCrossEntropy,
)


def all_providers(device: str, names: tuple[str, ...] | None = None) -> list[Provider]:
    """One instance of each provider for ``device``, optionally only those in ``names``."""
    known = [cls.name for cls in PROVIDERS]
    if names:
        unknown = set(names) - set(known)
        if unknown:
            raise ValueError(f"providers must be among {known}, got unknown {sorted(unknown)}")
    return [cls(device) for cls in PROVIDERS if not names or cls.name in names]


__all__ = ["MODES", "PROVIDERS", "Mode", "Provider", "all_providers"]
