"""``airpack fit MODEL --plan``: the smallest GPU count per type, what it holds, the bandwidth bound, prices."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from conftest import run_cli

from airpack.errors import PriceFileError
from airpack.gpus import CATALOG
from airpack.ops.plan import parse_prices


def big_model(root: Path, *, layers: int = 4, vocab: int = 500_000, hidden: int = 8192) -> Path:
    """A Llama model folder whose safetensors file is sparse (the estimator reads only its header): ~16 GB of weights."""
    root.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 32768,
           "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(cfg))
    specs: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden]), ("lm_head.weight", [vocab, hidden])]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [(p + "self_attn.q_proj.weight", [hidden, hidden]), (p + "self_attn.k_proj.weight", [1024, hidden]),
                  (p + "self_attn.v_proj.weight", [1024, hidden]), (p + "self_attn.o_proj.weight", [hidden, hidden]),
                  (p + "mlp.gate_proj.weight", [4 * hidden, hidden]), (p + "mlp.up_proj.weight", [4 * hidden, hidden]),
                  (p + "mlp.down_proj.weight", [hidden, 4 * hidden]), (p + "input_layernorm.weight", [hidden])]
    header, off = {}, 0
    for name, shape in specs:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return root


def test_catalog_has_bandwidth_with_a_source() -> None:
    for g in CATALOG:
        assert g.bandwidth_gbps > 0 and g.bandwidth_source, g.key
    h100 = next(g for g in CATALOG if g.key == "H100-80GB")
    assert h100.bandwidth_gbps == 3350 and "datasheet" in h100.bandwidth_source


def test_plan_json_smallest_count_per_gpu(tmp_path: Path) -> None:
    model = big_model(tmp_path / "m")
    r = run_cli("fit", model, "--plan", "--gpus", "H100,L4,RTX-4090", "--context", "8192", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    opts = {o["gpu"]: o for o in d["options"]}
    assert list(opts) == ["H100-80GB", "L4", "RTX-4090"]
    assert opts["H100-80GB"]["count"] == 1
    assert opts["L4"]["count"] in (2, 4) and opts["RTX-4090"]["count"] in (2, 4)
    for o in opts.values():
        assert o["fits"] and o["verdict"] in ("fits", "tight") and o["max_context"] >= 8192
        assert o["memory_left_bytes"] >= 0 and o["max_concurrency"] >= 1
        assert o["decode_tokens_per_s_upper_bound"] > 0 and o["bandwidth_source"]
    # the bound is bandwidth / bytes read per step: more bandwidth per GPU and fewer bytes per GPU, a higher bound
    h = opts["H100-80GB"]
    assert h["decode_tokens_per_s_upper_bound"] == pytest.approx(3350e9 / h["decode_bytes_per_token"], rel=1e-3)
    assert "upper bound" in d["decode_rate_is"]


def test_plan_text_and_prices(tmp_path: Path) -> None:
    model = big_model(tmp_path / "m")
    prices = tmp_path / "prices.toml"
    prices.write_text('currency = "EUR"\n[prices]\nh100 = { hour = 2.5, card = 25000 }\nL4 = { hour = 0.5 }\n')
    r = run_cli("fit", model, "--plan", "--gpus", "H100-80GB,L4", "--context", "8192", "--prices", prices, "--json")
    assert r.returncode == 0, r.stderr
    opts = {o["gpu"]: o for o in json.loads(r.stdout)["options"]}
    assert opts["H100-80GB"]["cost_per_hour"] == 2.5 and opts["H100-80GB"]["cost_cards"] == 25000
    assert opts["L4"]["cost_per_hour"] == 0.5 * opts["L4"]["count"] and "cost_cards" not in opts["L4"]
    t = run_cli("fit", model, "--plan", "--gpus", "H100-80GB,L4", "--context", "8192", "--prices", prices)
    assert t.returncode == 0 and "upper" in t.stdout and "EUR" in t.stdout and "H100-80GB" in t.stdout


def test_plan_none_fits_is_exit_5(tmp_path: Path) -> None:
    model = big_model(tmp_path / "m", vocab=4_000_000)  # ~130 GB of embeddings
    r = run_cli("fit", model, "--plan", "--gpus", "L4", "--context", "4096", "--json")
    assert r.returncode == 5, r.stderr
    d = json.loads(r.stdout)
    assert d["options"][0]["fits"] is False and d["error"]["exit_code"] == 5


@pytest.mark.parametrize("args", [
    ("--plan", "--gpus", "H100,NoSuchGPU"),
    ("--plan", "--gpus", "A100"),  # ambiguous: 40 or 80 GB
    ("--plan", "--gpus", "H100:2"),
    ("--plan", "--gpus", ","),
    ("--gpus", "H100"),  # without --plan
    ("--plan", "--gpu", "H100"),
    ("--plan", "--trace"),
])
def test_plan_usage_errors_are_exit_2(tiny_model: Path, args: tuple[str, ...]) -> None:
    r = run_cli("fit", tiny_model, *args, "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error" in json.loads(r.stdout) and "Traceback" not in r.stderr


@pytest.mark.parametrize(("text", "why"), [
    ("not toml [", "not valid TOML"),
    ("[prices]\n", r"no \[prices\]"),
    ("colour = 1\n[prices]\nH100 = { hour = 1 }\n", "unknown key 'colour'"),
    ("[prices]\nH100 = { hour = -1 }\n", "positive number"),
    ("[prices]\nH100 = { hour = true }\n", "positive number"),
    ("[prices]\nH100 = { hour = nan }\n", "positive number"),
    ("[prices]\nH100 = { monthly = 1 }\n", "unknown key 'monthly'"),
    ("[prices]\nWarpDrive = { hour = 1 }\n", "unknown GPU"),
    ("[prices]\nH100 = { hour = 1 }\nH100-80GB = { hour = 2 }\n", "second time"),
    ("[prices]\nH100 = 3\n", "must be a table"),
    ("currency = 3\n[prices]\nH100 = { hour = 1 }\n", "currency"),
])
def test_price_file_is_parsed_strictly(text: str, why: str) -> None:
    with pytest.raises(PriceFileError, match=why) as e:
        parse_prices(text.encode(), "prices.toml")
    assert e.value.exit_code == 2


def test_bad_price_file_through_the_cli_is_exit_2(tiny_model: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text("[prices]\nH100 = { hour = 0 }\n")
    r = run_cli("fit", tiny_model, "--plan", "--gpus", "H100", "--prices", p)
    assert r.returncode == 2 and "positive number" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("fit", tiny_model, "--plan", "--gpus", "H100", "--prices", tmp_path / "missing.toml")
    assert r.returncode == 2 and "cannot read price file" in r.stderr
