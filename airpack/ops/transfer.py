"""Check and repair a bundle split into parts for removable media (``airpack verify --parts``, ``airpack repair``).

Verifying the bundle *inside* the parts is the one pipeline's job
(``ops.verify.verify_source`` over a ``sources.PartsSource``); this module
only answers the courier's question about the media: are all parts there and
intact against the signed parts index, and can parity rebuild the lost ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..parts import PartsIndex, PartsReport, check_parts, load_index, parts_error, repair
from ..progress import NULL_PROGRESS, Progress
from ..sources import detect
from ..trust import TrustedKey, TrustPolicy


@dataclass(frozen=True)
class PartsCheck:
    """The signed parts index, who signed it, and every part checked against it; ``to_json``: ``verify --parts --json``."""

    index_path: Path
    index: PartsIndex
    signers: tuple[TrustedKey, ...]
    report: PartsReport

    def to_json(self) -> dict[str, Any]:
        return {"verified": True, "parts_index": str(self.index_path), "signers": [k.name for k in self.signers],
                "tar": self.index.tar_name, "tar_size": self.index.tar_size, "tar_sha256": self.index.tar_sha256,
                "bundle": self.index.bundle, **self.report.to_json()}


@dataclass(frozen=True)
class RepairResult:
    """The parts as found before the repair (``report``) and the parts rebuilt; ``to_json``: ``repair --json``."""

    index_path: Path
    index: PartsIndex
    signers: tuple[TrustedKey, ...]
    report: PartsReport
    repaired: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"parts_index": str(self.index_path), "repaired": list(self.repaired), **self.report.to_json()}


def _index_path(path: Path) -> Path:
    kind, index = detect(path)
    if kind != "parts":
        raise UsageError(f"{path} is not a parts folder (no *.index.dsse.json parts index in it)", path=str(path))
    return index


def _check(path: Path, policy: TrustPolicy, *, workers: int | None, progress: Progress) -> PartsCheck:
    """Signature of the index first, then every part (data and parity) hashed against it."""
    idx_path = _index_path(path)
    index, verified = load_index(idx_path, policy)
    task = progress.task(f"check parts of {index.tar_name}", sum(p.size for p in index.parts))
    try:
        report = check_parts(idx_path.parent, index, workers=workers, on_bytes=task.advance)
    finally:
        task.close()
    return PartsCheck(index_path=idx_path, index=index, signers=verified.signers, report=report)


def check_parts_folder(path: Path, policy: TrustPolicy, *, workers: int | None = None,
                       progress: Progress = NULL_PROGRESS) -> PartsCheck:
    """Every part intact, or a ``PartsError`` naming the lost ones and whether repair can rebuild them."""
    checked = _check(path, policy, workers=workers, progress=progress)
    if checked.report:
        raise parts_error(checked.index, checked.report, checked.index_path.parent)
    return checked


def repair_parts(path: Path, policy: TrustPolicy, *, workers: int | None = None,
                 progress: Progress = NULL_PROGRESS) -> RepairResult:
    """Find the lost parts, rebuild them from parity, and check each against the signed index."""
    checked = _check(path, policy, workers=workers, progress=progress)
    found = RepairResult(index_path=checked.index_path, index=checked.index, signers=checked.signers, report=checked.report)
    if not checked.report:
        return found
    index = checked.index
    task = progress.task(f"repair {index.tar_name}", index.layout.part_size * index.layout.data_parts)
    try:
        rebuilt = repair(checked.index_path.parent, index, checked.report, on_bytes=task.advance)
    finally:
        task.close()
    return RepairResult(index_path=found.index_path, index=found.index, signers=found.signers, report=found.report,
                        repaired=tuple(rebuilt))
