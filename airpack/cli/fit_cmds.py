"""``airpack fit``: will a model run on these GPUs, and at what context length?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..units import format_bytes
from ..vram import KV_DTYPES, RUNTIMES
from . import cli
from ._common import Output, airpack_command

if TYPE_CHECKING:
    from ..ops.fit import FitReport

VERDICT_TEXT = {"fits": "fits", "tight": "tight (within 5% of the limit)", "does_not_fit": "DOES NOT FIT"}


def _row(label: str, value: str, extra: str = "") -> str:
    return f"  {label:<18}{value:>12}   {extra}".rstrip()


def _line(label: str, text: str) -> str:
    return f"  {label:<18}{text}"


def report_lines(rep: FitReport, *, utilization: str) -> list[str]:
    r = rep.result
    est = r.estimate
    b = est.breakdown
    gpu = r.gpu
    free = f", {format_bytes(gpu.free_bytes)} free now" if gpu.free_bytes is not None else ""
    if est.runtime == "vllm":
        usable = f"vllm, gpu_memory_utilization {utilization}: {format_bytes(r.limit_bytes)} usable per GPU"
    else:
        usable = f"transformers generate: {format_bytes(r.limit_bytes)} usable per GPU"
    quant = f", {rep.weights.quantization}" if rep.weights.quantization else ""
    run = f"context {est.context} tokens x batch {est.batch}"
    if est.runtime == "transformers":
        run += f" (prompt {est.prompt_tokens} + {est.new_tokens} new)"
    lines = [
        f"model     {rep.model}  ({rep.location})",
        f"          {rep.shape.describe()}",
        f"gpu       {gpu.count} x {gpu.name}, {format_bytes(gpu.memory_bytes)} each ({gpu.source}{free})",
        f"runtime   {usable}",
        f"run       {run}; KV cache {est.kv_dtype}, {est.kv_bytes_per_token:,} bytes per token per GPU",
        "",
        f"  {'':<18}{'per GPU':>12}",
        _row("weights", format_bytes(b.weights), f"{rep.weights.parameters:,} parameters{quant}"),
        _row("KV cache", format_bytes(b.kv_cache)),
        _row("activations", format_bytes(b.activations)),
        _row("overhead", format_bytes(b.overhead),
             "CUDA context, libraries, workspace, allocator" + (", NCCL" if est.overhead.communication else "")),
        _row("total", format_bytes(r.per_gpu_bytes), f"of {format_bytes(r.limit_bytes)} usable"),
        _row("free memory", format_bytes(r.headroom_bytes) if r.headroom_bytes >= 0 else "-" + format_bytes(-r.headroom_bytes),
             "left after this run" if r.headroom_bytes >= 0 else "short"),
        _line("verdict", VERDICT_TEXT.get(r.verdict, r.verdict)),
    ]
    if r.max_context == 0:
        longest = "none: not even one token fits"
    else:
        longest = f"{r.max_context:,} tokens" + (" (the model's maximum)" if r.max_context >= r.model_max_context else "")
    lines.append(_line("longest context", longest))
    if est.runtime == "vllm":
        lines.append(_row("KV pool", format_bytes(r.kv_pool_bytes),
                          f"{r.kv_token_capacity:,} tokens; {r.max_concurrency} sequence(s) of {est.context} at once"))
    for n in r.notes:
        lines.append(f"  note: {n}")
    return lines


@airpack_command(cli, "fit")
@click.argument("model")
@click.option("--gpu", help="GPUs to fit on: a name or size with an optional count (H100-80GB:2, L4, 24GiB:1); default: this host's, via NVML.")
@click.option("--context", type=click.IntRange(min=1), help="Tokens per sequence (prompt + new tokens); default: the model's maximum.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences at once.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=256, show_default=True, help="Generated tokens per sequence (transformers).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="vllm", show_default=True)
@click.option("--kv-dtype", type=click.Choice([k for k in KV_DTYPES if k != "fp32"]), default="auto", show_default=True,
              help="KV cache dtype (auto: the model's).")
@click.option("--gpu-memory-utilization", "utilization", default="0.9", show_default=True, help="vLLM's share of each GPU.")
@click.option("--registry", type=click.Path(path_type=Path), envvar="AIRPACK_REGISTRY",
              help="Registry to find an installed MODEL in (or AIRPACK_REGISTRY).")
@click.option("--trust", "policy", type=click.Path(path_type=Path), envvar="AIRPACK_TRUST",
              help="Trust policy to verify a bundle tar or parts folder with as it streams (or AIRPACK_TRUST).")
def fit_cmd(out: Output, model: str, gpu: str | None, context: int | None, batch: int, new_tokens: int, runtime: str,
            kv_dtype: str, utilization: str, registry: Path | None, policy: Path | None) -> None:
    """Estimate whether MODEL (a model folder, a bundle folder, tar or parts folder, or an installed repo id) fits. Exit 5 if not."""
    from ..ops.fit import FitOptions, fit_error, fit_model, report_json
    from ..trust import load_policy
    from ..vram import parse_utilization

    util = str(parse_utilization(utilization))
    reports = fit_model(FitOptions(model=model, gpu=gpu, context=context, batch=batch, new_tokens=new_tokens, runtime=runtime,
                                   kv_dtype=kv_dtype, gpu_memory_utilization=util, registry=registry,
                                   policy=load_policy(policy) if policy is not None else None))
    failing = [r for r in reports if r.result.verdict == "does_not_fit"]
    doc: dict[str, Any] = report_json(reports)

    def text() -> list[str]:
        lines: list[str] = []
        for i, rep in enumerate(reports):
            if i:
                lines.append("")
            lines += report_lines(rep, utilization=util)
        return lines

    if failing:  # exit 5: the report, then the error, through the one exit surface
        out.result_then_fail(doc, text, fit_error(failing[0]))
    out.result(doc, text)
