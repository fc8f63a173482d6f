"""Pack the wheels a spec names: fetched for the target, checked, pinned by hash.

pip downloads into the unfinished bundle's staging folder (kept across runs,
so a re-run does not fetch again what it has whole); each wheel is then
copied into ``wheels/`` while hashing, and ``wheels/requirements.txt`` pins
every one of them by SHA-256 for ``pip install --no-index --require-hashes``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .._fs import atomic_write
from ..errors import IntegrityError
from ..fetch.wheels import Wheel, compatible_platforms, download_wheels, index_args, requirements_text, resolve_wheels, target_args
from ..manifest import FileEntry
from ..sbom import wheel_licenses
from ..spec import WheelSpec
from ._pack_common import STAGING_DIR, PackOptions, PlannedFile, copy_into

WHEELS_DIR = "wheels"
REQUIREMENTS = f"{WHEELS_DIR}/requirements.txt"


def _staging_key(spec: WheelSpec) -> str:
    """Same requirements and target → same download folder, so a re-run reuses what pip fetched."""
    doc = {
        "requirements": list(spec.requirements),
        "requirements_file": spec.requirements_file.read_text("utf-8", errors="replace")
        if spec.requirements_file is not None and spec.requirements_file.is_file() else None,
        "target": target_args(spec),
        "index": index_args(spec),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _with_licenses(record: dict[str, Any], opts: PackOptions) -> dict[str, Any]:
    """The wheel's record with the licence its METADATA declares (read from the bundle's copy, whose hash was checked)."""
    declared = wheel_licenses(opts.out.joinpath(*record["path"].split("/")))
    return {**record, "licenses": declared} if declared else record


def pack_wheels(spec: WheelSpec, opts: PackOptions) -> tuple[list[dict[str, Any]], list[FileEntry], list[PlannedFile]]:
    if opts.dry_run:
        resolved = resolve_wheels(spec)
        records = [{**w, "path": f"{WHEELS_DIR}/{w['filename']}"} for w in resolved]
        planned = [PlannedFile(bundle_path=r["path"], size=r["size"] or 0, source=r["filename"]) for r in records]
        return records, [], planned

    staging = opts.out / STAGING_DIR / f"wheels-{_staging_key(spec)}"
    opts.progress.message(f"wheels: resolving for python {spec.python_version} on {', '.join(spec.platforms)}")
    wheels: list[Wheel] = download_wheels(spec, staging)
    task = opts.progress.task("wheels", sum(w.size for w in wheels))
    try:
        entries: list[FileEntry] = []
        for w in wheels:
            e = copy_into(w.path, opts.out, f"{WHEELS_DIR}/{w.filename}", task.advance)
            if e.sha256 != w.sha256:  # the staging copy changed under us
                raise IntegrityError(f"{w.filename} changed while it was copied into the bundle", path=e.path,
                                     hint="Something wrote to the pack's staging folder meanwhile; run pack again.")
            entries.append(e)
    finally:
        task.close()
    req = requirements_text(wheels, spec).encode("utf-8")
    (opts.out / WHEELS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(opts.out / REQUIREMENTS, req)
    entries.append(FileEntry(path=REQUIREMENTS, size=len(req), sha256=hashlib.sha256(req).hexdigest()))
    records = [_with_licenses(w.record(f"{WHEELS_DIR}/{w.filename}"), opts) for w in sorted(wheels, key=lambda w: w.name)]
    planned = [PlannedFile(bundle_path=e.path, size=e.size, source=e.path) for e in entries]
    opts.progress.message(
        f"wheels: {len(wheels)} for {spec.implementation}{spec.python_version.replace('.', '')} on "
        f"{len(compatible_platforms(spec.platforms))} compatible platform tag(s)"
    )
    return records, entries, planned
