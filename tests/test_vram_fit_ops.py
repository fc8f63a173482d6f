"""The fit operation's Python API: install's gate, reading models, hostile configs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import verify
from factories import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vram_fixtures import config, llama_header

from airpack.errors import FitError, ModelConfigError, UnsafePathError
from airpack.ops.fit import check_bundle_fit, estimate_target, load_folder, select_weight_files
from airpack.vram import RunConfig, collect_weights, estimate, model_shape


def only_ints_and_strings(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_ints_and_strings(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(only_ints_and_strings(v) for v in obj)
    return isinstance(obj, str) or (isinstance(obj, int) and not isinstance(obj, bool))


# -- install's gate ------------------------------------------------------------------------------------------------


def test_check_bundle_fit_reports_json_able_dicts(bundle: Path, policy: Path) -> None:
    vb = verify(bundle, policy)
    (rep,) = check_bundle_fit(vb, gpu="1GiB", context=None, runtime="transformers", ignore=False)
    assert only_ints_and_strings(rep)
    assert rep["model"] == rep["repo_id"] == "acme/tiny" and rep["verdict"] == "fits"
    assert rep["context"] == 2048  # no --context: the model's maximum
    json.dumps(rep)


def test_check_bundle_fit_refuses_naming_model_gpu_and_numbers(bundle: Path, policy: Path) -> None:
    vb = verify(bundle, policy)
    with pytest.raises(FitError) as e:
        check_bundle_fit(vb, gpu="700MiB:1", context=512, runtime="transformers", ignore=False)
    msg = e.value.message
    assert e.value.exit_code == 5
    assert "acme/tiny" in msg and "1 x 700MiB GPU" in msg and "700.00 MiB is usable" in msg and "context 512" in msg
    (rep,) = check_bundle_fit(vb, gpu="700MiB:1", context=512, runtime="transformers", ignore=True)
    assert rep["verdict"] == "does_not_fit"


def test_check_bundle_fit_without_gpus_returns_nothing(bundle: Path, policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert check_bundle_fit(verify(bundle, policy), gpu=None, context=None, runtime=None, ignore=False) == []


def test_a_model_without_config_is_reported_unknown_and_never_blocks(make_bundle: Callable[..., Path], policy: Path,
                                                                     tmp_path: Path) -> None:
    src = make_model(tmp_path / "noconf")
    (src / "config.json").unlink()
    vb = verify(make_bundle(model_dir=src), policy)
    (rep,) = check_bundle_fit(vb, gpu="64MiB", context=None, runtime=None, ignore=False)
    assert rep["verdict"] == "unknown" and "config.json" in rep["reason"]


def test_estimate_target_for_a_runtime_not_modelled(bundle: Path) -> None:
    est = estimate_target(bundle, "models/acme--tiny", "acme/tiny", gpu="L4", count=1, context=None, runtime="llamacpp", batch=1)
    assert est["verdict"] == "unknown" and "llamacpp" in est["reason"]


# -- reading models -----------------------------------------------------------------------------------------------------


def test_index_decides_which_shards_are_weights() -> None:
    idx = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()
    names = ["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"]
    assert select_weight_files(names, lambda: idx) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert select_weight_files(["consolidated.safetensors", "model.safetensors"], None) == ["model.safetensors"]
    assert select_weight_files(["consolidated.safetensors"], None) == ["consolidated.safetensors"]
    with pytest.raises(ModelConfigError, match="not there"):
        select_weight_files(["model-00001-of-00002.safetensors"], lambda: idx)
    with pytest.raises(UnsafePathError):
        select_weight_files(names, lambda: b'{"weight_map": {"a": "../../etc/passwd.safetensors"}}')
    with pytest.raises(ModelConfigError, match="no safetensors"):
        select_weight_files(["pytorch_model.bin"], None)


def test_a_hugging_face_snapshot_of_links_is_read(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    blobs = tmp_path / "cache" / "blobs"
    snap = tmp_path / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blobs / f.name, snap), snap / f.name)
    m = load_folder(snap)
    assert m.config["model_type"] == "llama" and len(m.tensors) == len(llama_header(m.config))


# -- hostile or odd configs never crash the estimator -------------------------------------------------------------------

KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
        "max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "kv_lora_rank",
        "qk_rope_head_dim", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "text_config", "torch_dtype",
        "tie_word_embeddings", "sliding_window_pattern", "attention_chunk_size", "n_shared_experts", "first_k_dense_replace"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-5, max_value=300), st.floats(allow_nan=True), st.text(max_size=12),
                   st.lists(st.sampled_from(["full_attention", "sliding_attention", "mamba", 3]), max_size=6),
                   st.dictionaries(st.sampled_from(KEYS[:8]), st.integers(min_value=1, max_value=64), max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), st.booleans())
def test_any_config_either_estimates_or_is_a_named_error(overrides: dict[str, Any], on_valid_base: bool) -> None:
    cfg = {**config(), **overrides} if on_valid_base else overrides
    try:
        shape = model_shape(cfg)
    except ModelConfigError:
        return
    weights = collect_weights([], shape=shape)
    for runtime in ("transformers", "vllm"):
        est = estimate(shape, weights, RunConfig(runtime=runtime, context=min(shape.max_context, 1 << 16), tensor_parallel=3))
        assert est.per_gpu_bytes > 0
        assert all(isinstance(v, int) and v >= 0 for v in est.breakdown.to_json().values())
