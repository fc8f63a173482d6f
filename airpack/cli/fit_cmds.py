"""``airpack fit``: will a model run on these GPUs, and at what context length?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from ..units import format_bytes
from ..vram import KV_DTYPES, RUNTIMES
from . import cli
from ._common import Output, airpack_command, hub_token

if TYPE_CHECKING:
    from ..ops.fit import FitReport, ModelSource
    from ..ops.plan import Plan

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
        *hub_lines(rep.hub),
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
    if rep.trace is not None:
        t = rep.trace
        res = t.result
        backends = ", ".join(f"{k} {v}" for k, v in sorted(res.backends.items())) or "none"
        lines += [
            "",
            _line("trace", f"transformers {res.transformers_version} generate(), torch {res.torch_version}, "
                           f"attention {res.attn_implementation or '?'} (SDPA calls: {backends})"),
            _row("peak allocated", format_bytes(res.peak_allocated), f"weights {format_bytes(res.weights_allocated)}"),
            _row("peak reserved", format_bytes(res.peak_reserved), "what the caching allocator holds"),
            _row("footprint", format_bytes(t.per_gpu_bytes), f"with CUDA context and libraries; estimate {format_bytes(t.estimate_bytes)}"),
            _line("traced verdict", VERDICT_TEXT.get(t.verdict, t.verdict)),
        ]
        for why in res.fallback_reasons:
            lines.append(f"  note: attention left the flash kernel: {why}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    return lines


def hub_lines(hub: dict[str, Any] | None) -> list[str]:
    """What was read from the Hub for a model fitted before downloading (config, index, headers: never weights)."""
    if hub is None:
        return []
    return [f"hub       {hub['endpoint']} commit {hub['commit']}: read {format_bytes(hub['bytes_read'])} in "
            f"{hub['requests']} GET(s) (config, index, safetensors headers) of {format_bytes(hub['repo_bytes'])}"]


def _money(v: float | None, currency: str) -> str:
    return "-" if v is None else f"{v:,.2f}{' ' + currency if currency else ''}"


def plan_lines(plan: Plan, hub: dict[str, Any] | None = None) -> list[str]:
    """The plan as a table: one row per GPU type, the smallest count that fits and what it holds."""
    priced = any(o.cost_per_hour is not None or o.cost_cards is not None for o in plan.options)
    lines = [
        f"model     {plan.model}  ({plan.location})",
        f"          {plan.shape.describe()}",
        *hub_lines(hub),
        f"run       {plan.runtime}, context {plan.context:,} tokens x batch {plan.batch}; weights "
        f"{format_bytes(plan.weights.total_bytes)}",
        "",
        f"  {'GPU':<14}{'count':>5}  {'per GPU':>10}  {'left':>10}  {'longest ctx':>11}  {'sequences':>9}  {'decode <=':>12}"
        + (f"  {'per hour':>14}  {'cards':>14}" if priced else ""),
    ]
    for o in plan.options:
        r = o.result
        if not o.count:
            lines.append(f"  {o.gpu.key:<14}{'-':>5}  does not fit on 8 or fewer"
                         + (f" (needs {format_bytes(r.per_gpu_bytes)} per GPU on 8)" if r is not None else ""))
            continue
        assert r is not None
        rate = f"{o.decode_upper_bound:,.0f} tok/s" if o.decode_upper_bound else "?"
        row = (f"  {o.gpu.key:<14}{o.count:>5}  {format_bytes(r.per_gpu_bytes):>10}  {format_bytes(r.headroom_bytes):>10}  "
               f"{r.max_context:>11,}  {o.max_concurrency:>9,}  {rate:>12}")
        if priced:
            row += f"  {_money(o.cost_per_hour, plan.currency):>14}  {_money(o.cost_cards, plan.currency):>14}"
        lines.append(row)
    lines += [
        "",
        "  sequences: how many sequences of the context fit at once; decode <=: tokens per second one sequence can reach",
        "  at most, from memory bandwidth (weights read per step + its KV cache / the datasheet bandwidth) -- an upper",
        "  bound, never a promise; real kernels reach a fraction of it.",
    ]
    return lines


def _plan(out: Output, model: str, gpus: str | None, prices: Path | None, context: int | None, batch: int,
          new_tokens: int, runtime: str, kv_dtype: str, util: str, registry: Path | None,
          sources: list[ModelSource] | None) -> None:
    from ..errors import FitError
    from ..ops.plan import DEFAULT_GPUS, PlanOptions, load_prices, parse_gpu_list, plan_model

    keys = parse_gpu_list(gpus) if gpus is not None else DEFAULT_GPUS
    price_table = load_prices(prices) if prices is not None else None
    plans = plan_model(PlanOptions(model=model, gpus=keys, context=context, batch=batch, new_tokens=new_tokens,
                                   runtime=runtime, kv_dtype=kv_dtype, gpu_memory_utilization=util, registry=registry,
                                   prices=price_table), sources)
    hub = sources[0].hub if sources else None
    doc: dict[str, Any] = plans[0].to_json() if len(plans) == 1 else {"models": [p.to_json() for p in plans]}
    if hub is not None:
        doc["hub"] = dict(hub)

    def text() -> list[str]:
        lines: list[str] = []
        for i, p in enumerate(plans):
            lines += ([""] if i else []) + plan_lines(p, hub)
        return lines

    failing = [p for p in plans if not p.any_fits]
    if failing:
        out.result_then_fail(doc, text, FitError(
            f"{failing[0].model} fits none of {', '.join(keys)} with 8 or fewer GPUs at context {failing[0].context} x batch {batch}",
            hint="Try a shorter --context, --batch 1, a quantized model, or larger GPUs in --gpus."))
    out.result(doc, text)


def _hub_sources(model: str, registry: Path | None, endpoint: str | None, token_file: Path | None,
                 policy: Path | None) -> list[ModelSource] | None:
    """MODEL read from the Hub when ``ops.fit.model_kind`` says it is a Hub id (None: a path or an installed model).

    Only flags given on the command line count as asking for the Hub: HF_ENDPOINT alone only says which Hub, and
    AIRPACK_REGISTRY yields to an explicit --endpoint/--token-file.
    """
    from ..ops.fit import model_kind

    ctx = click.get_current_context()
    asked = ctx.get_parameter_source("endpoint") == click.core.ParameterSource.COMMANDLINE or token_file is not None
    explicit_registry = ctx.get_parameter_source("registry") == click.core.ParameterSource.COMMANDLINE
    kind = model_kind(model, registry=registry if (explicit_registry or not asked) else None, hub=asked)
    if kind != "hub":
        return None
    if policy is not None and ctx.get_parameter_source("policy") == click.core.ParameterSource.COMMANDLINE:
        raise UsageError("--trust verifies a bundle tar or parts folder; a Hub model is read unsigned, before packing",
                         hint="Drop --trust to fit the Hub's repo.")
    from ..ops.fit_hub import load_hub_model  # the network: only for a Hub id

    return [load_hub_model(model, endpoint=endpoint, token=hub_token(token_file))]


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
@click.option("--trace", is_flag=True,
              help="Also trace transformers' generate() on CPU (needs torch and transformers: pip install 'airpack[trace]'); "
                   "implies --runtime transformers.")
@click.option("--plan", is_flag=True, help="A sizing plan: for each GPU type, the fewest GPUs (1, 2, 4, 8) that fit and what they hold.")
@click.option("--gpus", help="GPU types for --plan, comma-separated (default: H100-80GB,H200,B200,A100-80GB,A100-40GB,L40S,RTX-4090,L4).")
@click.option("--prices", type=click.Path(path_type=Path), help="TOML price file for --plan (your own figures per GPU-hour or per card).")
@click.option("--endpoint", envvar="HF_ENDPOINT",
              help="Hub endpoint for an ORG/NAME[@REVISION] MODEL (default: HF_ENDPOINT or the public Hub); "
                   "only config.json and the safetensors headers are read.")
@click.option("--token-file", type=click.Path(path_type=Path), help="File holding a Hub token (default: the HF_TOKEN variable).")
def fit_cmd(out: Output, model: str, gpu: str | None, context: int | None, batch: int, new_tokens: int, runtime: str,
            kv_dtype: str, utilization: str, registry: Path | None, policy: Path | None, trace: bool, plan: bool,
            gpus: str | None, prices: Path | None, endpoint: str | None, token_file: Path | None) -> None:
    """Estimate whether MODEL (a model folder, a bundle folder, tar or parts folder, an installed repo id, or a Hub
    repo ORG/NAME[@REVISION], read without its weights) fits. Exit 5 if not.

    Of a Hub repo only config.json, the shard index and the safetensors headers are read (range requests); a path
    that exists is always a path, and --registry keeps a repo id on the offline side (docs/fit.md).
    """
    from ..ops.fit import FitOptions, fit_error, fit_model, report_json
    from ..trust import load_policy
    from ..vram import parse_utilization

    util = str(parse_utilization(utilization))
    if plan or gpus is not None or prices is not None:
        if not plan:
            raise UsageError("--gpus and --prices go with --plan", hint="Add --plan, or use --gpu NAME:COUNT for one fit.")
        if gpu is not None or trace or policy is not None:
            raise UsageError("--plan sizes catalog GPUs: it takes --gpus, not --gpu, --trace or --trust",
                             hint="airpack fit MODEL --plan --gpus H100,L40S [--context N] [--batch N] [--prices FILE]")
        _plan(out, model, gpus, prices, context, batch, new_tokens, runtime, kv_dtype, util, registry,
              _hub_sources(model, registry, endpoint, token_file, None))
        return
    if trace and click.get_current_context().get_parameter_source("runtime") == click.core.ParameterSource.DEFAULT:
        runtime = "transformers"  # the trace runs transformers' generate(); vLLM cannot be traced
    sources = _hub_sources(model, registry, endpoint, token_file, policy)
    reports = fit_model(FitOptions(model=model, gpu=gpu, context=context, batch=batch, new_tokens=new_tokens, runtime=runtime,
                                   kv_dtype=kv_dtype, gpu_memory_utilization=util, registry=registry,
                                   policy=load_policy(policy) if policy is not None and sources is None else None,
                                   trace=trace), sources)
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
