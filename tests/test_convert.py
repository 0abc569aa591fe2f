"""Conversion: round trip, errors naming the bad tensor/field, atomic output, LLaDA-MoE layout."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jmoe
from checkpoints_convert.cli import main as convert_main


def run_cli(*args):
    return convert_main([*map(str, args), "--quiet"])


def test_round_trip_hf_jmoe_hf_is_bit_exact(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe(num_experts=4, tie_word_embeddings=False)
    assert run_cli("--hf-dir", hf_dir, "--out", tmp_path / "ck") == 0
    assert run_cli("--to-hf", tmp_path / "ck", "--out", tmp_path / "back") == 0
    a = load_file(hf_dir / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    # the exported folder loads in transformers again
    import transformers

    transformers.OlmoeForCausalLM.from_pretrained(tmp_path / "back")


def test_sharded_index_and_bfloat16(hf_olmoe, tmp_path):
    import torch

    hf_dir, tm = hf_olmoe()
    shard_dir = tmp_path / "sharded"
    tm.to(torch.bfloat16).save_pretrained(shard_dir, max_shard_size="20KB")
    assert (shard_dir / "model.safetensors.index.json").exists()
    assert run_cli("--hf-dir", shard_dir, "--out", tmp_path / "ck") == 0
    model = jmoe.load(tmp_path / "ck")
    assert model.config.dtype == "bfloat16"
    w = np.asarray(model.params["layer_1"]["moe"]["w_down"][3], np.float32)
    ref = tm.model.layers[1].mlp.experts.down_proj[3].float().detach().numpy()
    np.testing.assert_array_equal(w, ref.T)


def _break(hf_dir, fn):
    tensors = load_file(hf_dir / "model.safetensors")
    fn(tensors)
    save_file(tensors, hf_dir / "model.safetensors")


@pytest.mark.parametrize("kind,message", [
    ("missing", "missing tensor(s)"),
    ("unexpected", "unexpected tensor(s)"),
    ("shape", "has shape"),
])
def test_bad_tensors_raise_and_leave_out_untouched(hf_olmoe, tmp_path, capsys, kind, message):
    hf_dir, _ = hf_olmoe()
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    if kind == "missing":
        _break(hf_dir, lambda t: t.pop(key))
    elif kind == "unexpected":
        _break(hf_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    else:
        _break(hf_dir, lambda t: t.__setitem__(key, np.zeros((5, 32), np.float32)))
    out = tmp_path / "out"
    assert run_cli("--hf-dir", hf_dir, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err
    assert ("extra.weight" if kind == "unexpected" else key) in err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no partial folder


def test_failed_overwrite_keeps_previous_output(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe()
    out = tmp_path / "out"
    assert run_cli("--hf-dir", hf_dir, "--out", out) == 0
    before = sorted(os.listdir(out))
    _break(hf_dir, lambda t: t.pop("model.norm.weight"))
    assert run_cli("--hf-dir", hf_dir, "--out", out, "--overwrite") == 2
    assert sorted(os.listdir(out)) == before
    jmoe.load(out)  # still a whole checkpoint
    # an existing OUT without --overwrite is refused
    assert run_cli("--hf-dir", hf_dir, "--out", out) == 2


def test_missing_files_and_unknown_model_type(hf_olmoe, tmp_path, capsys):
    assert run_cli("--hf-dir", tmp_path / "nope", "--out", tmp_path / "o1") == 2
    assert "does not exist" in capsys.readouterr().err
    hf_dir, _ = hf_olmoe()
    os.remove(hf_dir / "model.safetensors")
    assert run_cli("--hf-dir", hf_dir, "--out", tmp_path / "o2") == 2
    assert "no model.safetensors" in capsys.readouterr().err
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert run_cli("--hf-dir", hf_dir, "--out", tmp_path / "o3") == 2
    assert "model_type='mixtral'" in capsys.readouterr().err
    os.remove(hf_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        jmoe.load(hf_dir)
    with pytest.raises(FileNotFoundError, match="index"):
        shard = tmp_path / "shard"
        shard.mkdir()
        (shard / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
        from checkpoints_convert.convert import SafetensorsReader

        SafetensorsReader(str(shard))


def test_load_overrides_and_unknown_field(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe()
    model = jmoe.load(hf_dir, causal=False, mask_token_id=96, moe_backend="dense")
    assert (model.config.causal, model.config.mask_token_id) == (False, 96)
    with pytest.raises(ValueError, match="unknown config field.*no_such_field"):
        jmoe.load(hf_dir, no_such_field=1)
    with pytest.raises(ValueError, match="mask_token_id=500"):
        jmoe.load(hf_dir, mask_token_id=500)


def test_console_script_convert(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe()
    r = subprocess.run([sys.executable, "-m", "jmoe.cli", "convert", "--hf-dir", str(hf_dir),
                        "--out", str(tmp_path / "ck"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ck" / "config.json").exists()
    r = subprocess.run([sys.executable, "-m", "jmoe.cli", "convert", "--hf-dir",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


# ---- LLaDA-MoE: per-head q/k norm, bidirectional, against a float64 NumPy oracle ----

def _rms(x, w, eps=1e-5):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _rope(x, pos, theta):  # x [L, H, K], NeoX halves
    k = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, k, 2) / k)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., k // 2:], x[..., :k // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def llada_moe_oracle(t, cfg, tokens):
    """Plain float64 forward of the published LLaDA-MoE modeling file's semantics."""
    d, h, n, e, k = (cfg[x] for x in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                      "num_experts", "num_experts_per_tok"))
    hd = d // h
    x = t["model.embed_tokens.weight"][tokens]
    pos = np.arange(len(tokens), dtype=np.float64)
    for i in range(cfg["num_hidden_layers"]):
        p = lambda s: t[f"model.layers.{i}.{s}"]
        hs = _rms(x, p("input_layernorm.weight"))
        q = _rms((hs @ p("self_attn.q_proj.weight").T).reshape(-1, h, hd), p("self_attn.q_norm.weight"))
        kk = _rms((hs @ p("self_attn.k_proj.weight").T).reshape(-1, n, hd), p("self_attn.k_norm.weight"))
        v = (hs @ p("self_attn.v_proj.weight").T).reshape(-1, n, hd)
        q, kk = _rope(q, pos, cfg["rope_theta"]), _rope(kk, pos, cfg["rope_theta"])
        kk, v = np.repeat(kk, h // n, 1), np.repeat(v, h // n, 1)
        s = np.einsum("lhk,shk->hls", q, kk) / np.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hls,shk->lhk", a, v).reshape(-1, d) @ p("self_attn.o_proj.weight").T
        hs = _rms(x, p("post_attention_layernorm.weight"))
        logits = hs @ p("mlp.gate.weight").T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for tok in range(len(tokens)):
            for ex in np.argsort(-probs[tok], kind="stable")[:k]:  # no renormalisation
                g = hs[tok] @ p(f"mlp.experts.{ex}.gate_proj.weight").T
                u = hs[tok] @ p(f"mlp.experts.{ex}.up_proj.weight").T
                y = (g / (1 + np.exp(-g)) * u) @ p(f"mlp.experts.{ex}.down_proj.weight").T
                out[tok] += probs[tok, ex] * y
        x = x + out
    return _rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def make_llada_moe_folder(folder, seed=0):
    cfg = dict(model_type="llada", vocab_size=53, hidden_size=24, num_hidden_layers=2,
               num_attention_heads=3, num_key_value_heads=3, num_experts=6, num_experts_per_tok=2,
               expert_intermediate_size=10, dense_intermediate_size=40, qk_layernorm=True,
               rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=64,
               moe_layer_freq=[1, 1], mask_token_id=52, eos_token_id=51, pad_token_id=51,
               tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    d, f, hd = 24, 10, 8
    r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    t = {"model.embed_tokens.weight": r(53, d), "lm_head.weight": r(53, d),
         "model.norm.weight": 1 + r(d)}
    for i in range(2):
        pre = f"model.layers.{i}."
        t.update({pre + "input_layernorm.weight": 1 + r(d),
                  pre + "post_attention_layernorm.weight": 1 + r(d),
                  pre + "self_attn.q_proj.weight": r(d, d), pre + "self_attn.k_proj.weight": r(d, d),
                  pre + "self_attn.v_proj.weight": r(d, d), pre + "self_attn.o_proj.weight": r(d, d),
                  pre + "self_attn.q_norm.weight": 1 + r(hd), pre + "self_attn.k_norm.weight": 1 + r(hd),
                  pre + "mlp.gate.weight": r(6, d)})
        for e in range(6):
            t.update({pre + f"mlp.experts.{e}.gate_proj.weight": r(f, d),
                      pre + f"mlp.experts.{e}.up_proj.weight": r(f, d),
                      pre + f"mlp.experts.{e}.down_proj.weight": r(d, f)})
    os.makedirs(folder)
    save_file(t, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return cfg, {k: v.astype(np.float64) for k, v in t.items()}


def test_llada_moe_per_head_qk_norm_matches_oracle(tmp_path):
    cfg, t = make_llada_moe_folder(tmp_path / "hf")
    assert run_cli("--hf-dir", tmp_path / "hf", "--out", tmp_path / "ck") == 0
    model = jmoe.load(tmp_path / "ck")
    c = model.config
    assert (c.qk_norm, c.causal, c.mask_token_id, c.eos_token_id) == ("per_head", False, 52, 51)
    tokens = np.random.default_rng(5).integers(0, 53, 13)
    logits, _ = jmoe.forward(model, tokens[None])
    ref = llada_moe_oracle(t, cfg, tokens)
    assert np.abs(np.asarray(logits[0], np.float64) - ref).max() / np.abs(ref).max() < 1e-4
    # the same weights read with the OLMoE (whole-projection) norm scope are a different model
    assert run_cli("--to-hf", tmp_path / "ck", "--out", tmp_path / "back") == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert all(back[k].tobytes() == t[k].astype(np.float32).tobytes() for k in t)
