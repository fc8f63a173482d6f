"""Fit before downloading: a Hub model's config.json and safetensors headers as the estimator's input.

``airpack fit ORG/NAME[@REVISION]`` (and ``--plan``) and ``pack --dry-run``'s
``[[targets]]`` answer the sizing question on the connected side before a
weight byte is fetched: ``fetch.hub_meta`` reads config.json, the shard index
and each chosen shard's header (two small range requests per shard), and the
result goes through the very path a local folder takes (``fit.load_remote`` →
``fit._assemble`` → ``fit.estimate_source``), so the two can never disagree.

This module sits above ``ops.fit`` and below ``ops.pack``: ``ops.fit`` and
``ops.plan`` are on the offline side and never import ``airpack.fetch``, so
the command line reads a Hub model here and hands them the ``ModelSource``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import AirpackError, FetchError, GatedRepoError, RevisionNotFoundError
from ..spec import TargetSpec
from ._pack_common import ModelPlan, PackOptions
from .fit import ModelSource, estimate_target_source, hub_id, load_paths, load_remote

FIT_HINTS: dict[type[AirpackError], str] = {
    GatedRepoError: "Accept the model's licence on the Hub and pass a token (HF_TOKEN or --token-file); nothing was downloaded.",
    RevisionNotFoundError: "Check ORG/NAME and @REVISION (a branch, tag or commit), and --endpoint; a local folder of that "
                           "name would have been used had it existed.",
    FetchError: "Check the network, --endpoint (or HF_ENDPOINT) and the token (HF_TOKEN or --token-file); nothing was "
                "downloaded, so just run it again.",
}


@contextlib.contextmanager
def fit_hints() -> Iterator[None]:
    """A Hub error met while fitting gets advice about fitting, not pack's "run pack again: it resumes"."""
    try:
        yield
    except AirpackError as e:
        if e.hint == type(e).default_hint:
            e.hint = next((h for cls, h in FIT_HINTS.items() if isinstance(e, cls)), e.hint)
        raise


def load_hub_model(model: str, *, endpoint: str | None, token: str | None, timeout: float = 30,
                   files: list[str] | None = None) -> ModelSource:
    """``ORG/NAME[@REVISION]`` read from the Hub: resolved to a commit, then only config, index and header bytes.

    The source's ``hub`` record says where it came from and what was read (requests and
    bytes), so ``fit --json`` shows that nothing big moved.
    """
    from ..fetch.hub_meta import open_reader  # the network: only when a model really comes from the Hub

    ident = hub_id(model)
    if ident is None:
        raise RevisionNotFoundError(f"{model} is not a Hub repo id (ORG/NAME[@REVISION])", path=model)
    repo_id, revision = ident
    with fit_hints(), open_reader(repo_id, revision, endpoint=endpoint, token=token, timeout=timeout) as reader:
        src = load_remote(reader, files=files, prefetch=reader.headers)
        record: dict[str, Any] = {
            "endpoint": reader.client.endpoint, "repo_id": repo_id, "revision": revision, "commit": reader.commit,
            "requests": reader.stats.requests, "bytes_read": reader.stats.bytes,
            "repo_bytes": sum(f.size for f in reader.snap.files),
        }
    return replace(src, hub=record)


def _plan_source(plan: ModelPlan, opts: PackOptions) -> ModelSource:
    """The model a pack plan would write, read without writing: its Hub headers (at the resolved commit) or its folder's."""
    rec = plan.record
    pre = rec["path"] + "/"
    rels = [p.bundle_path[len(pre):] for p in plan.planned if p.bundle_path.startswith(pre)]
    if rec["source"] == "hub":
        return load_hub_model(f"{rec['repo_id']}@{rec['commit']}", endpoint=opts.endpoint, token=opts.token,
                              timeout=opts.timeout, files=rels)
    paths = {p.bundle_path[len(pre):]: Path(p.source) for p in plan.planned if p.bundle_path.startswith(pre)}
    return load_paths(paths, name=rec["repo_id"], location=rec["path"])


def dry_run_estimator(plans: list[ModelPlan], opts: PackOptions) -> Callable[[TargetSpec, dict[str, Any]], dict[str, Any]]:
    """``estimate(target, model record)`` for ``pack.fit_targets`` in a dry run: each model read once, from its plan."""
    by_path = {p.record["path"]: p for p in plans}
    cache: dict[str, ModelSource] = {}
    lock = threading.Lock()

    def load(path: str) -> ModelSource:
        with lock:
            if path not in cache:
                cache[path] = _plan_source(by_path[path], opts)
            return cache[path]

    def estimate(t: TargetSpec, m: dict[str, Any]) -> dict[str, Any]:
        return estimate_target_source(lambda: load(m["path"]), m["repo_id"], gpu=t.gpu, count=t.count, context=t.context,
                                      runtime=t.runtime, batch=t.batch)

    return estimate

