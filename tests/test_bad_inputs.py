"""Bad inputs are refused in one clear line, and nothing is silently changed (issue 14).

Table-driven: each row builds its bad input in ``tmp_path``, runs the API (and for
conversions the command line), and asserts the exception type (CLI: exit code 2 and
one ``error: ...`` line), that the message names the bad value or file and what was
expected, and that nothing new is left on disk (``no_new_files``, hidden files
included). Sections: convert and load; API; CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from typing import Callable

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import own_stderr_lines
from safetensors.numpy import load_file, save_file

import jmoe
import jmoe.cli
from jmoe.checkpoint import DEFAULT_MODEL_DIR
from jmoe.config import LLADA2_GENERATION
from jmoe.convert import hf_to_jmoe, jmoe_to_hf, main as convert_main
from jmoe.sampling.generate import random_key
from jmoe.sampling.options import resolve_options


# -- helpers for every section --

def disk_listing(root) -> dict:
    """Every path under ``root`` (hidden ones too): files with their size, folders as None."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = None
        for f in files:
            p = os.path.join(folder, f)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


@contextlib.contextmanager
def no_new_files(root):
    """The body leaves ``root`` as it found it: nothing new, nothing removed or resized."""
    before = disk_listing(root)
    yield
    after = disk_listing(root)
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert not (new or gone or changed), f"new: {new[:5]}, gone: {gone[:5]}, changed: {changed[:5]}"


def assert_says(message: str, says) -> None:
    """One line that contains every expected fragment."""
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    for s in says:
        assert s in message, f"{s!r} not in {message!r}"


def cli_error(capsys, argv) -> str:
    """Run ``python -m checkpoints_convert``'s main in-process; return its one error line."""
    capsys.readouterr()
    assert convert_main([*map(str, argv), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- convert and load --

@dataclasses.dataclass(frozen=True)
class Case:
    """A bad input built in tmp_path. ``call``: "convert" (hf_to_jmoe / --hf-dir),
    "export" (jmoe_to_hf / --to-hf) or "load" (jmoe.load); ``says``: fragments the
    message must hold (the bad value or file, and what was expected)."""

    call: str
    args: dict
    says: tuple


def _hf(hf, **kw):
    return hf(**kw)[0]


def _edit_config(folder, fn):
    """Edit config.json: ``fn`` changes the dict in place or returns a new JSON value."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg = fn(cfg) or cfg
    path.write_text(json.dumps(cfg))
    return path


def _damaged_weights(hf):
    """An HF folder whose weights are unreadable: checks that must come first do."""
    d = _hf(hf)
    (d / "model.safetensors").write_bytes(b"")
    return d


def _write_weights(data: Callable[[bytes], bytes]):
    def build(t, hf):
        d = _hf(hf)
        f = d / "model.safetensors"
        f.write_bytes(data(f.read_bytes()))
        return Case("convert", dict(hf_dir=d, out=t / "ck"), (str(f), "not a readable safetensors"))
    return build


def _no_tensors(t, hf):
    d = _hf(hf)
    save_file({}, d / "model.safetensors")
    return Case("convert", dict(hf_dir=d, out=t / "ck"),
                (str(d / "model.safetensors"), "holds no tensors"))


def _index_invalid_json(t, hf):
    d = _hf(hf)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    return Case("convert", dict(hf_dir=d, out=t / "ck"),
                (str(d / "model.safetensors.index.json"), "not valid JSON", "line 1"))


def _config(fn, *says):
    def build(t, hf):
        d = _hf(hf)
        path = _edit_config(d, fn)
        return Case("convert", dict(hf_dir=d, out=t / "ck"), (str(path),) + says)
    return build


def _config_text(text_fn, *says):
    def build(t, hf):
        d = _hf(hf)
        path = d / "config.json"
        path.write_text(text_fn(path.read_text()))
        return Case("convert", dict(hf_dir=d, out=t / "ck"), (str(path),) + says)
    return build


def _out_is_source(t, hf):
    d = _hf(hf)
    return Case("convert", dict(hf_dir=d, out=d, overwrite=True), (str(d), "is the source"))


def _out_inside_source(t, hf):
    d = _hf(hf)
    return Case("convert", dict(hf_dir=d, out=d / "ck", overwrite=True),
                (str(d / "ck"), "is inside the source"))


def _out_contains_source(t, hf):
    d = _hf(hf)
    return Case("convert", dict(hf_dir=d, out=t, overwrite=True), (str(t), "contains the source"))


def _out_exists(t, hf):
    d = _damaged_weights(hf)  # refused for the existing output, before any weight is read
    (t / "ck").mkdir()
    (t / "ck" / "keep.txt").write_text("mine")
    return Case("convert", dict(hf_dir=d, out=t / "ck"), (str(t / "ck"), "already exists",
                                                          "--overwrite"))


def _out_under_a_file(t, hf):
    d = _damaged_weights(hf)
    (t / "a_file").write_text("x")
    return Case("convert", dict(hf_dir=d, out=t / "a_file" / "sub" / "ck"),
                ("cannot write output", str(t / "a_file"), "is a file, not a folder"))


def _out_not_permitted(t, hf):
    probe = "/sys/jmoe-bad-inputs-probe"
    try:
        os.mkdir(probe)
    except OSError:
        pass
    else:
        os.rmdir(probe)
        pytest.skip("/sys is writable here")
    d = _damaged_weights(hf)
    out = "/sys/jmoe-bad-inputs-out/ck"
    return Case("convert", dict(hf_dir=d, out=out), ("cannot write output", out))


def _out_read_only_parent(t, hf):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    d = _damaged_weights(hf)
    (t / "ro").mkdir()
    os.chmod(t / "ro", 0o555)
    return Case("convert", dict(hf_dir=d, out=t / "ro" / "ck"),
                ("cannot write output", str(t / "ro" / "ck"), "ermission denied"))


def _hf_dir_is_a_file(t, hf):
    d = _hf(hf)
    return Case("convert", dict(hf_dir=d / "config.json", out=t / "ck"),
                (str(d / "config.json"), "is a file, not a folder"))


def _hf_dir_missing(t, hf):
    return Case("convert", dict(hf_dir=t / "nope", out=t / "ck"), (str(t / "nope"), "does not exist"))


def _float16(t, hf):
    import torch

    _, tm = hf()
    tm.to(torch.float16).save_pretrained(t / "f16")
    return Case("convert", dict(hf_dir=t / "f16", out=t / "ck"),
                (str(t / "f16"), "float16", "'float32'", "'bfloat16'", "--dtype"))


def _declared_dtype_differs(t, hf):
    d = _hf(hf)
    path = _edit_config(d, lambda c: c.update(dtype="bfloat16"))
    return Case("convert", dict(hf_dir=d, out=t / "ck"),
                (str(path), "dtype='bfloat16'", "the weights are float32"))


def _mixed_dtypes(t, hf):
    d = _hf(hf)
    w = load_file(d / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"].astype(ml_dtypes.bfloat16)
    save_file(w, d / "model.safetensors")
    return Case("convert", dict(hf_dir=d, out=t / "ck"),
                ("mix dtypes", "float32", "bfloat16 ('model.norm.weight')"))


def _export_out_is_checkpoint(t, hf):
    ck = t / "ck"
    shutil.copytree(DEFAULT_MODEL_DIR, ck)
    return Case("export", dict(ckpt=ck, out=ck, overwrite=True), (str(ck), "is the source"))


def _truncated_checkpoint(t):
    ck = t / "ck"
    shutil.copytree(DEFAULT_MODEL_DIR, ck)
    data = ck / "params" / "ocdbt.process_0" / "d"
    for f in data.iterdir():
        os.truncate(f, f.stat().st_size // 2)
    return ck


def _export_damaged(t, hf):
    ck = _truncated_checkpoint(t)
    return Case("export", dict(ckpt=ck, out=t / "back"), (str(ck), "damaged"))


def _load(overrides, *says, path=None):
    def build(t, hf):
        folder = path(t, hf) if path else None
        return Case("load", dict(path=folder, overrides=overrides),
                    says + ((str(folder),) if folder else ()))
    return build


def _ckpt_config(fn):
    def path(t, hf):
        ck = t / "ck"
        shutil.copytree(DEFAULT_MODEL_DIR, ck)
        cfg_path = ck / "config.json"
        cfg_path.write_text(fn(cfg_path.read_text()))
        return ck
    return path


def _edit_json(fn):
    def edit(text):
        d = json.loads(text)
        fn(d)
        return json.dumps(d)
    return edit


def _no_params(t, hf):
    ck = t / "ck"
    shutil.copytree(DEFAULT_MODEL_DIR, ck)
    shutil.rmtree(ck / "params")
    return ck


def _set(key, value):
    return lambda c: c.update({key: value})


def _drop(key):
    def drop(c):
        del c[key]
    return drop


_BAD = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))

# (name, error, build(tmp_path, hf_olmoe) -> Case)
ROWS = [
    # (a) conversion never loses data; --out is checked before any weight is read
    ("out_is_source", ValueError, _out_is_source),
    ("out_inside_source", ValueError, _out_inside_source),
    ("out_contains_source", ValueError, _out_contains_source),
    ("out_exists", FileExistsError, _out_exists),
    ("out_under_a_file", ValueError, _out_under_a_file),
    ("out_not_permitted", ValueError, _out_not_permitted),
    ("out_read_only_parent", ValueError, _out_read_only_parent),
    ("export_out_is_checkpoint", ValueError, _export_out_is_checkpoint),
    # (b) damaged inputs
    ("safetensors_truncated", ValueError, _write_weights(lambda b: b[: len(b) // 2])),
    ("safetensors_empty", ValueError, _write_weights(lambda b: b"")),
    ("safetensors_random_bytes", ValueError, _write_weights(lambda b: _BAD)),
    ("safetensors_no_tensors", ValueError, _no_tensors),
    ("index_invalid_json", ValueError, _index_invalid_json),
    ("config_without_num_experts", ValueError,
     _config(_drop("num_experts"), "'num_experts'", "expected a positive int")),
    ("config_json_list", ValueError,
     _config(lambda c: [c], "expected a JSON object", "list")),
    ("config_invalid_json", ValueError,
     _config_text(lambda s: s[:-3], "not valid JSON", "line")),
    ("config_num_layers_string", ValueError,
     _config(_set("num_hidden_layers", "2"), "num_hidden_layers='2'", "positive int")),
    ("hf_dir_is_a_file", ValueError, _hf_dir_is_a_file),
    ("hf_dir_missing", FileNotFoundError, _hf_dir_missing),
    ("export_damaged_checkpoint", ValueError, _export_damaged),
    # (c) every field read is applied exactly or refused
    ("weights_float16", ValueError, _float16),
    ("config_dtype_differs_from_weights", ValueError, _declared_dtype_differs),
    ("weights_mixed_dtypes", ValueError, _mixed_dtypes),
    ("rope_scaling", ValueError, _config(
        _set("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        "rope_type 'linear'", "plain RoPE")),
    ("rope_legacy_scaling", ValueError, _config(
        _set("rope_scaling", {"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'",
        "plain RoPE")),
    ("rope_theta_twice", ValueError, _config(
        _set("rope_theta", 500.0), "rope_theta=500.0", "rope_parameters.rope_theta=10000.0",
        "one value")),
    ("olmoe_partial_rotary", ValueError, _config(
        lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5),
        "partial_rotary_factor=0.5", "expected 1.0")),
    ("eos_outside_vocab", ValueError, _config(
        _set("eos_token_id", 50279), "eos_token_id=50279", "[0, vocab_size=97)",
        "eos_token_id=None")),
    ("eos_several_ids", ValueError, _config(
        _set("eos_token_id", [3, 5]), "eos_token_id=[3, 5]", "one eos_token_id")),
    # (c) a load override must keep every weight's shape (the shipped 4-layer model)
    ("load_num_layers", ValueError, _load(dict(num_layers=2), "num_layers=2", "num_layers=4")),
    ("load_num_experts", ValueError, _load(dict(num_experts=8), "num_experts=8", "num_experts=16")),
    ("load_hidden_size", ValueError, _load(dict(hidden_size=64), "hidden_size=64", "=128")),
    ("load_vocab_size", ValueError, _load(dict(vocab_size=60), "vocab_size=60", "=57")),
    ("load_num_heads", ValueError, _load(dict(num_heads=8), "num_heads=8", "num_heads=4")),
    ("load_num_kv_heads", ValueError, _load(dict(num_kv_heads=2), "num_kv_heads=2", "=4")),
    ("load_head_dim", ValueError, _load(dict(head_dim=16), "head_dim=16", "head_dim=32")),
    ("load_moe_intermediate_size", ValueError,
     _load(dict(moe_intermediate_size=32), "moe_intermediate_size=32", "=64")),
    ("load_qk_norm", ValueError, _load(dict(qk_norm="per_head"), "qk_norm='per_head'",
                                       "qk_norm='whole'")),
    ("load_tie_word_embeddings", ValueError,
     _load(dict(tie_word_embeddings=True), "tie_word_embeddings=True", "=False")),
    ("load_num_shared_experts", ValueError,
     _load(dict(num_shared_experts=1), "num_shared_experts=1", "num_shared_experts=0")),
    ("load_first_k_dense_replace", ValueError,
     _load(dict(first_k_dense_replace=1, intermediate_size=256), "first_k_dense_replace=1",
           "first_k_dense_replace=0")),
    ("load_hf_folder_num_layers", ValueError,
     _load(dict(num_layers=1), "num_layers=1", "num_layers=2", path=lambda t, hf: _hf(hf))),
    ("load_hf_eos_outside_vocab", ValueError,
     _load({}, "eos_token_id=500", path=lambda t, hf: _hf(hf, eos_token_id=500, vocab_size=97))),
    # (b) damaged jmoe checkpoints and paths
    ("load_truncated_params", ValueError,
     _load({}, "params/ is damaged", path=lambda t, hf: _truncated_checkpoint(t))),
    ("load_config_not_params", ValueError,
     _load({}, "does not match its params/", "layer_3",
           path=_ckpt_config(_edit_json(lambda d: d.update(num_layers=3))))),
    ("load_config_invalid_json", ValueError,
     _load({}, "config.json: not valid JSON", path=_ckpt_config(lambda s: s[:10]))),
    ("load_config_unknown_field", ValueError,
     _load({}, "unknown field(s) ['bogus']",
           path=_ckpt_config(_edit_json(lambda d: d.update(bogus=1))))),
    ("load_no_params", FileNotFoundError, _load({}, "no params/ folder", path=_no_params)),
    ("load_path_is_a_file", ValueError,
     _load({}, "is a file, not a folder", path=lambda t, hf: _hf(hf) / "config.json")),
    ("load_path_missing", FileNotFoundError,
     _load({}, "does not exist", path=lambda t, hf: t / "nope")),
]
CLI_ROWS = [r for r in ROWS if not r[0].startswith("load_")]


def _api(case: Case):
    a = case.args
    if case.call == "convert":
        return hf_to_jmoe(a["hf_dir"], a["out"], overwrite=a.get("overwrite", False),
                          progress=False)
    if case.call == "export":
        return jmoe_to_hf(a["ckpt"], a["out"], overwrite=a.get("overwrite", False),
                          progress=False)
    return jmoe.load(a["path"], tokenizer=False, **a["overrides"])


@pytest.mark.parametrize("name,error,build", ROWS, ids=[r[0] for r in ROWS])
def test_convert_and_load_refuse(name, error, build, tmp_path, hf_olmoe):
    case = build(tmp_path, hf_olmoe)
    with no_new_files(tmp_path), pytest.raises(error) as e:
        _api(case)
    assert type(e.value) is error
    assert_says(str(e.value), case.says)


@pytest.mark.parametrize("name,error,build", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_convert_cli_refuses_in_one_line(name, error, build, tmp_path, hf_olmoe, capsys):
    case = build(tmp_path, hf_olmoe)
    a = case.args
    argv = (["--hf-dir", a["hf_dir"]] if case.call == "convert" else ["--to-hf", a["ckpt"]])
    argv += ["--out", a["out"]] + (["--overwrite"] if a.get("overwrite") else [])
    with no_new_files(tmp_path):
        line = cli_error(capsys, argv)
    assert_says(line, case.says)


def test_damaged_checkpoint_stderr_is_one_line(tmp_path):
    """No storage dump and no "Event loop is closed" tracebacks: one error line."""
    ck = _truncated_checkpoint(tmp_path)
    r = subprocess.run([sys.executable, "-m", "checkpoints_convert", "--to-hf", str(ck),
                        "--out", str(tmp_path / "back"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    ours = own_stderr_lines(r.stderr)
    assert len(ours) == 1 and ours[0].startswith("error: ") and str(ck) in ours[0], r.stderr
    assert "Event loop is closed" not in r.stderr and len(r.stderr) < 2000
    assert not (tmp_path / "back").exists()


def test_overrides_that_keep_the_shapes_are_applied():
    """Overrides that touch no weight's shape are applied as asked, the function-changing
    ones (rope_theta, rotary_fraction, num_experts_per_tok) included."""
    mesh = jmoe.make_mesh(data=1, expert=1)
    given = dict(dtype="bfloat16", moe_backend="dense", routing="expert_choice",
                 capacity_factor=2.0, causal=False, attention_block_length=4, mask_token_id=3,
                 eos_token_id=4, pad_token_id=5, generation={"steps": 3},
                 ep_capacity_factor=1.5, rope_theta=500.0, rotary_fraction=0.5,
                 num_experts_per_tok=2, mesh=mesh)
    model = jmoe.load(tokenizer=False, **given)
    for k, v in given.items():
        assert getattr(model.config, k) == v, k
    assert model.params["layer_0"]["attn"]["wq"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_token_id_override_replaces_an_id_outside_the_vocabulary(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe()
    _edit_config(hf_dir, _set("eos_token_id", 50279))
    assert jmoe.load(hf_dir, eos_token_id=None, tokenizer=False).config.eos_token_id is None
    hf_to_jmoe(hf_dir, tmp_path / "ck", eos_token_id=7, progress=False)
    assert jmoe.load(tmp_path / "ck").config.eos_token_id == 7


def test_float16_weights_convert_only_when_asked(hf_olmoe, tmp_path):
    import torch

    _, tm = hf_olmoe()
    tm.to(torch.float16).save_pretrained(tmp_path / "f16")
    assert convert_main(["--hf-dir", str(tmp_path / "f16"), "--out", str(tmp_path / "ck"),
                         "--dtype", "float32", "--quiet"]) == 0
    model = jmoe.load(tmp_path / "ck")
    assert model.config.dtype == "float32"
    want = load_file(tmp_path / "f16" / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    got = np.asarray(model.params["layer_1"]["attn"]["wq"])
    np.testing.assert_array_equal(got, want.astype(np.float32).T)  # float16 -> float32 is exact


def test_rope_parameters_layout_matches_transformers(hf_olmoe):
    """transformers 5 writes rope_theta inside rope_parameters; jmoe must apply it (a far
    theta from the default 10000 makes reading the default a large error)."""
    import torch

    hf_dir, tm = hf_olmoe(rope_parameters={"rope_type": "default", "rope_theta": 50.0})
    assert "rope_theta" not in json.loads((hf_dir / "config.json").read_text())
    model = jmoe.load(hf_dir)
    assert model.config.rope_theta == 50.0
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
    logits, _ = jmoe.forward(model, tokens)
    with torch.no_grad():
        ref = tm(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(logits, np.float64) - ref).max() / np.abs(ref).max() < 1e-4


def test_generation_keys_jmoe_cannot_honour_are_reported(hf_olmoe, caplog):
    hf_dir, _ = hf_olmoe()
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    gen.update(do_sample=True, repetition_penalty=1.1, top_p=0.9, max_new_tokens=16,
               pad_token_id=[1, 2])
    (hf_dir / "generation_config.json").write_text(json.dumps(gen))
    with caplog.at_level(logging.WARNING, logger="jmoe"):
        model = jmoe.load(hf_dir)
    assert model.config.generation["gen_length"] == 16
    assert model.config.generation["top_p"] == 0.9  # honoured since issue 15
    text = caplog.text
    assert "generation_config.json" in text and "do_sample=True" in text
    assert "repetition_penalty=1.1" in text and "top_p=0.9" not in text
    assert "pad_token_id=[1, 2]" in text
    for quiet in ("transformers_version", "_from_model_config", "max_new_tokens", "eos_token_id"):
        assert quiet not in text.split("ignored")[0], quiet


def _owner_gone_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_work_folders_of_killed_runs_are_removed_by_the_next_run(hf_olmoe, tmp_path):
    import socket

    hf_dir, _ = hf_olmoe()
    host, dead = socket.gethostname(), _owner_gone_pid()
    stale = [f".ck.partial-{dead}@{host}-0badc0de", ".ck.partial-abc_1234", f".ck.old-{dead}@{host}-00000000"]
    kept = [f".ck.partial-{os.getpid()}@{host}-11111111",  # a live run
            f".ck.partial-{dead}@another-host-22222222",  # cannot tell: left alone
            f".other.partial-{dead}@{host}-33333333"]      # another output's
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"0" * 1000)
    assert convert_main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "ck"), "--quiet"]) == 0
    left = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
    assert left == sorted(kept)


def test_killed_swap_restores_the_previous_output(hf_olmoe, tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next
    run puts the old one back (and then, without --overwrite, refuses to replace it)."""
    import socket

    hf_dir, _ = hf_olmoe()
    aside = tmp_path / f".ck.old-{_owner_gone_pid()}@{socket.gethostname()}-44444444"
    shutil.copytree(DEFAULT_MODEL_DIR, aside / "x")
    assert convert_main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "ck"), "--quiet"]) == 2
    assert not aside.exists()
    assert jmoe.load(tmp_path / "ck").config.num_layers == 4  # the shipped model, restored


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(hf_olmoe, tmp_path, umask):
    hf_dir, _ = hf_olmoe()
    old = os.umask(umask)
    try:
        hf_to_jmoe(hf_dir, tmp_path / "ck", progress=False)
        jmoe_to_hf(tmp_path / "ck", tmp_path / "back", progress=False)
    finally:
        os.umask(old)
    for top in ("ck", "back"):
        for folder, dirs, files in os.walk(tmp_path / top):
            assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask, folder
            for f in files:
                mode = os.stat(os.path.join(folder, f)).st_mode & 0o777
                assert mode == 0o666 & ~umask, (f, oct(mode))


def test_failed_run_removes_the_folders_it_created(hf_olmoe, tmp_path):
    hf_dir, _ = hf_olmoe()
    (hf_dir / "model.safetensors").write_bytes(b"")
    with no_new_files(tmp_path), pytest.raises(ValueError, match="not a readable safetensors"):
        hf_to_jmoe(hf_dir, tmp_path / "new" / "deep" / "ck", progress=False)


def test_llada2_config_fields_applied_or_refused():
    """LLaDA2's config.json: a setting jmoe does not implement is refused; an omitted mask
    id is the family tokenizer's when the vocabulary holds it, else None (a tiny model)."""
    import llada2_reference as ref

    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        jmoe.LLaDA2Config.from_hf_config(dict(ref.TINY, norm_topk_prob=False))
    tiny = {k: v for k, v in ref.TINY.items() if k not in ("mask_token_id", "eos_token_id")}
    c = jmoe.LLaDA2Config.from_hf_config(tiny)
    assert (c.mask_token_id, c.eos_token_id) == (None, None)
    c = jmoe.LLaDA2Config.from_hf_config(dict(tiny, vocab_size=157184))
    assert (c.mask_token_id, c.eos_token_id) == (156895, 156892)
    with pytest.raises(ValueError, match=r"mask_token_id=71: expected a token id in \[0, vocab_size=71\)"):
        jmoe.LLaDA2Config.from_hf_config(dict(ref.TINY, mask_token_id=71))
    assert jmoe.LLaDA2Config.from_hf_config(dict(ref.TINY, mask_token_id=71),
                                            mask_token_id=70).mask_token_id == 70


# -- API (jmoe.forward, jmoe.generate) and the command line -----------------------------
# Each row names a call, the exception it must raise (CLI: exit code 2 and one stderr
# line starting "error:") and the words its message must hold: the bad value (or dtype,
# or shape) and what was expected. Everything runs on the shipped model or a tiny random
# LLaDA2; the error rows fail before any compile.

V, MAXPOS = 57, 64  # the shipped model's vocabulary and positions (E = 16, top-k 4)
TINY_LLADA2 = jmoe.LLaDA2Config(
    vocab_size=71, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=64, mask_token_id=70, eos_token_id=69, pad_token_id=69,
    moe_backend="dense", generation=LLADA2_GENERATION)


@pytest.fixture(scope="module")
def shipped():
    m = jmoe.load()
    assert (m.config.vocab_size, m.config.max_position_embeddings) == (V, MAXPOS)
    assert (m.config.num_experts, m.config.num_experts_per_tok) == (16, 4)
    return m


@pytest.fixture(scope="module")
def llada2():
    return jmoe.random_model(TINY_LLADA2)


def fwd(tokens, **kw):
    return lambda m: jmoe.forward(m, tokens, **kw)


def gen(prompts, **kw):
    return lambda m: jmoe.generate(m, prompts, **kw)


TOK = [[4, 5, 6]]  # [1, 3]

FORWARD_ROWS = [
    ("empty_length", fwd(np.zeros((1, 0), np.int32)), ["(1, 0)", "at least one"]),
    ("empty_batch", fwd(np.zeros((0, 3), np.int32)), ["(0, 3)", "at least one"]),
    ("float_array", fwd(np.array([[4.0, 5.0]])), ["float64", "integer token ids"]),
    ("float_list", fwd([[4.0, 5]]), ["float64", "integer token ids"]),
    ("float32_jax", fwd(jax.numpy.ones((1, 2))), ["float32", "integer token ids"]),
    ("bool_array", fwd(np.ones((1, 2), bool)), ["bool", "integer token ids"]),
    ("three_d", fwd(np.zeros((1, 2, 3), np.int32)), ["(1, 2, 3)", "[batch, length]"]),
    ("ragged", fwd([[1, 2], [3]]), ["[batch, length]"]),
    ("too_long", fwd(np.zeros((1, MAXPOS + 1), np.int32)),
     [f"L={MAXPOS + 1}", f"max_position_embeddings={MAXPOS}"]),
    ("id_past_vocab", fwd([[1, V]]), [f"token id {V}", f"[0, {V})"]),
    ("negative_id", fwd([[1, -3]]), ["token id -3", f"[0, {V})"]),
    ("budget_shape", fwd(TOK, experts_per_token=np.ones((2, 2), np.int32)),
     ["(2, 2)", "scalar", "[B, L] = (1, 3)"]),
    ("budget_shape_1d", fwd(TOK, experts_per_token=np.ones(4, np.int32)),
     ["(4,)", "scalar", "[B, L] = (1, 3)"]),
    ("budget_float", fwd(TOK, experts_per_token=2.0), ["float64", "int"]),
    ("budget_float_array", fwd(TOK, experts_per_token=np.full((1, 3), 2.0)),
     ["float64", "int"]),
    ("budget_zero", fwd(TOK, experts_per_token=np.zeros((1, 3), np.int32)),
     ["value 0", "1..4"]),
    ("max_experts_past_e", fwd(TOK, max_experts=17), ["max_experts=17", "1..num_experts=16"]),
    ("max_experts_float", fwd(TOK, max_experts=2.0), ["max_experts=2.0", "an int"]),
    ("mask_shape", fwd(TOK, attention_mask=[[1, 1]]), ["(1, 2)", "(1, 3)"]),
    ("mask_value", fwd(TOK, attention_mask=[[1, 2, 1]]), ["holds 2", "0/1"]),
    ("mask_half", fwd(TOK, attention_mask=[[1, 0.5, 1]]), ["holds 0.5", "0/1"]),
]

GENERATE_ROWS = [
    ("empty_list", gen([]), ["empty list", "at least one prompt"]),
    ("empty_tuple", gen(()), ["empty list", "at least one prompt"]),
    ("float_array", gen(np.array([[4.0, 5.0]])), ["float64", "integer token ids"]),
    ("float_row_array", gen([np.array([4.0, 5.0])]), ["float64", "integer token ids"]),
    ("float_list", gen([4.0, 5.0]), ["4.0", "float", "int token ids"]),
    ("float_rows", gen([[4, 5.0]]), ["5.0", "float", "int token ids"]),
    ("bool_array", gen(np.ones((1, 2), bool)), ["bool", "integer token ids"]),
    ("three_d", gen(np.zeros((1, 2, 3), np.int32)), ["(1, 2, 3)", "[B, P]"]),
    ("mixed", gen(["1+1=", [4, 5]]), ["mixes strings and token ids", "all strings"]),
    ("dict", gen({"a": 1}), ["dict", "a string"]),
    ("id_past_vocab", gen([[1, V]]), [f"token id {V}", f"[0, {V})"]),
    ("gen_length_float", gen("1+1=", gen_length=6.7), ["gen_length=6.7", "positive int"]),
    ("gen_length_whole_float", gen("1+1=", gen_length=6.0), ["gen_length=6.0", "positive int"]),
    ("gen_length_np_float", gen("1+1=", gen_length=np.float64(6)), ["gen_length=", "positive int"]),
    ("gen_length_bool", gen("1+1=", gen_length=True), ["gen_length=True", "positive int"]),
    ("gen_length_zero", gen("1+1=", gen_length=0), ["gen_length=0", "positive int"]),
    ("block_length_float", gen("1+1=", gen_length=6, block_length=3.0),
     ["block_length=3.0", "positive int"]),
    ("steps_float", gen("1+1=", steps=3.0), ["steps=3.0", "positive int"]),
    ("steps_str", gen("1+1=", steps="3"), ["steps='3'", "positive int"]),
    ("not_multiple", gen("1+1=", gen_length=6, block_length=4),
     ["gen_length=6", "block_length=4"]),
    ("cfg_inf", gen("1+1=", cfg_scale=math.inf), ["cfg_scale=inf", "finite number >= 0"]),
    ("cfg_nan", gen("1+1=", cfg_scale=math.nan), ["cfg_scale=nan", "finite number >= 0"]),
    ("cfg_negative", gen("1+1=", cfg_scale=-1.0), ["cfg_scale=-1.0", "finite number >= 0"]),
    ("temperature_inf", gen("1+1=", temperature=math.inf),
     ["temperature=inf", "finite number >= 0"]),
    ("temperature_nan", gen("1+1=", temperature=np.float32("nan")),
     ["temperature=", "finite number >= 0"]),
    ("temperature_str", gen("1+1=", temperature="hot"), ["temperature='hot'", "number"]),
    ("threshold_nan", gen("1+1=", threshold=math.nan), ["threshold=nan", "(0, 1]"]),
    ("threshold_inf", gen("1+1=", threshold=math.inf), ["threshold=inf", "(0, 1]"]),
    ("threshold_zero", gen("1+1=", threshold=0.0), ["threshold=0.0", "(0, 1]"]),
    ("threshold_str", gen("1+1=", threshold="0.5"), ["threshold='0.5'", "(0, 1]"]),
    ("seed_2_64", gen("1+1=", seed=2 ** 64), [str(2 ** 64), "[0, 2**64)"]),
    ("seed_negative", gen("1+1=", seed=-1), ["seed=-1", "[0, 2**64)"]),
    ("seed_float", gen("1+1=", seed=1.5), ["seed=1.5", "[0, 2**64)"]),
    ("seed_str", gen("1+1=", seed="3"), ["seed='3'", "[0, 2**64)"]),
    ("seed_bool", gen("1+1=", seed=True), ["seed=True", "[0, 2**64)"]),
    ("mask_id_float", gen("1+1=", mask_id=2.0), ["mask_id=2.0", f"[0, {V})"]),
    ("eos_id_past_vocab", gen("1+1=", eos_id=V), [f"eos_id={V}", f"[0, {V})"]),
    ("cache_unknown", gen("1+1=", cache="fast"), ["cache='fast'", "'prefix'", "'dual'"]),
    ("cache_int", gen("1+1=", cache=1), ["cache=1", "False, True"]),
    ("cache_refresh_zero", gen("1+1=", cache="dual", cache_refresh=0),
     ["cache_refresh=0", "positive int"]),
    ("cache_refresh_float", gen("1+1=", cache="dual", cache_refresh=1.0),
     ["cache_refresh=1.0", "positive int"]),
    ("cache_window_short", gen("1+1=", cache="prefix", cache_window=(1,)),
     ["cache_window=(1,)", "(before, after)"]),
    ("cache_window_negative", gen("1+1=", cache="prefix", cache_window=(-1, 2)),
     ["cache_window=(-1, 2)", ">= 0"]),
    ("cache_refresh_uncached", gen("1+1=", cache=False, cache_refresh=2),
     ["cache_refresh=2", "cache='prefix' or 'dual'"]),
    ("cache_window_uncached", gen("1+1=", cache_window=(1, 1)),
     ["cache_window=(1, 1)", "cache='prefix' or 'dual'"]),
    ("cache_exact_bidirectional", gen("1+1=", cache="exact"), ["cache='exact'", "block-causal"]),
    ("cache_dual_llada2", gen("1+1=", cache="dual", convention="llada2"),
     ["cache='dual'", "block-causal", "'exact'"]),
]


@pytest.mark.parametrize("fn, words", [r[1:] for r in FORWARD_ROWS + GENERATE_ROWS],
                         ids=[r[0] for r in FORWARD_ROWS + GENERATE_ROWS])
def test_api_refuses(shipped, fn, words):
    with pytest.raises(ValueError) as e:
        fn(shipped)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert "outside the vocabulary" not in msg or "token id" in words[0]  # no float as an id


LLADA2_ROWS = [
    ("block_length_zero", dict(block_length=0), ["block_length=0", "positive int"], "gen_length"),
    ("block_length_float", dict(block_length=4.0), ["block_length=4.0", "positive int"],
     "gen_length"),
    ("steps_zero", dict(steps=0), ["steps=0", "positive int"], "gen_length"),
    ("gen_length_zero", dict(gen_length=0), ["gen_length=0", "positive int"], "block_length"),
]


@pytest.mark.parametrize("kw, words, not_named", [r[1:] for r in LLADA2_ROWS],
                         ids=[r[0] for r in LLADA2_ROWS])
def test_llada2_lengths_name_the_bad_one(llada2, kw, words, not_named):
    with pytest.raises(ValueError) as e:
        jmoe.generate(llada2, [[1, 2, 3]], **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not_named not in str(e.value)


def test_unset_lengths_are_derived_from_the_set_ones(shipped):
    cfg = shipped.config
    # llada (the shipped model, generation config gen 6, block 6, steps 6): a block of 6
    # does not divide 8, so one block of 8; the model's 6 steps fit (<= 8, one block)
    opts, _ = resolve_options(cfg, gen_length=8)
    assert (opts.gen_length, opts.block_length, opts.steps) == (8, 8, 6)
    opts, _ = resolve_options(cfg, gen_length=12)  # 6 divides 12: two blocks
    assert (opts.block_length, opts.steps) == (6, 6)
    opts, _ = resolve_options(cfg, gen_length=4)  # steps capped at gen_length
    assert (opts.block_length, opts.steps) == (4, 4)
    opts, _ = resolve_options(cfg, gen_length=np.int64(12), block_length=np.int32(4))
    assert (opts.gen_length, opts.block_length, opts.steps) == (12, 4, 6)  # 3 blocks | 6
    plain = cfg.replace(generation=None)  # the library's defaults
    opts, _ = resolve_options(plain, gen_length=40)  # 32 does not divide 40: one block
    assert (opts.block_length, opts.steps) == (40, 40)
    # llada2 (LLaDA2's generation defaults block 32, steps 32): the block stays, steps
    # are capped at gen_length as LLaDA2's generate does, caller's steps too
    opts, _ = resolve_options(TINY_LLADA2, gen_length=8)
    assert (opts.block_length, opts.steps) == (32, 8)
    opts, _ = resolve_options(TINY_LLADA2, gen_length=4, block_length=8, steps=8)
    assert (opts.block_length, opts.steps) == (8, 4)
    opts, _ = resolve_options(TINY_LLADA2.replace(generation=None), gen_length=8)
    assert (opts.block_length, opts.steps) == (8, 8)  # library: min(32, gen_length)


def test_gen_length_alone_generates(shipped):
    out = jmoe.generate(shipped, "12+30=", gen_length=8)
    assert out.tokens.shape == (1, 6 + 8)


def test_seeds_use_all_64_bits():
    data = lambda k: np.asarray(jax.random.key_data(k)).tolist()
    for s in (0, 5, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1):  # below 2**32: jax's own key
        assert data(random_key(s)) == data(jax.random.key(s))
    assert data(random_key(np.uint64(2 ** 64 - 1))) == [2 ** 32 - 1, 2 ** 32 - 1]
    # jax.random.key keeps 32 bits: seeds 2**32 apart would share a stream
    assert data(random_key(5 + 2 ** 32)) != data(random_key(5))


# -- command line ------------------------------------------------------------------


def run_cli(capsys, *args):
    try:
        rc = jmoe.cli.main(list(args))
    except SystemExit as e:  # argparse errors and --help
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


COMMAND_ROWS = [
    ("bench_repeats_zero", ["bench", "--repeats", "0"], ["--repeats", "positive int", "0"]),
    ("bench_batch_zero", ["bench", "--batch", "0"], ["--batch", "positive int", "0"]),
    ("bench_batch_float", ["bench", "--batch", "2.5"], ["--batch", "positive int", "2.5"]),
    ("routing_top_k_zero", ["routing", "1+1=", "--top-k", "0"], ["--top-k", "positive int"]),
    ("routing_top_k_past_e", ["routing", "1+1=", "--top-k", "17"],
     ["--top-k 17", "1..num_experts=16"]),
    ("gen_length_zero", ["generate", "1+1=", "--gen-length", "0"],
     ["--gen-length", "positive int"]),
    ("gen_length_float", ["generate", "1+1=", "--gen-length", "6.7"],
     ["--gen-length", "'6.7'"]),
    ("steps_zero", ["generate", "1+1=", "--steps", "0"], ["--steps", "positive int"]),
    ("seed_2_64", ["generate", "1+1=", "--seed", str(2 ** 64)], [str(2 ** 64), "[0, 2**64)"]),
    ("seed_negative", ["generate", "1+1=", "--seed", "-1"], ["seed=-1", "[0, 2**64)"]),
    ("cfg_inf", ["generate", "1+1=", "--cfg-scale", "inf"], ["cfg_scale=inf", "finite"]),
    ("temperature_inf", ["generate", "1+1=", "--temperature", "inf"],
     ["temperature=inf", "finite"]),
    ("threshold_nan", ["generate", "1+1=", "--threshold", "nan"], ["threshold=nan", "(0, 1]"]),
    ("no_prompt", ["generate"], ["no prompt", "--prompts-file"]),
    ("missing_prompts_file", ["generate", "--prompts-file", "/nonexistent/p.txt"],
     ["/nonexistent/p.txt"]),
    ("adaptive_initial_zero", ["generate", "1+1=", "--adaptive", "linear",
                               "--adaptive-initial", "0"], ["--adaptive-initial", "positive"]),
]


@pytest.mark.parametrize("args, words", [r[1:] for r in COMMAND_ROWS], ids=[r[0] for r in COMMAND_ROWS])
def test_cli_refuses_in_one_line(capsys, args, words):
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def no_tokenizer(monkeypatch, shipped):
    monkeypatch.setattr(jmoe.cli, "_load", lambda path: shipped.replace(tokenizer=None))


def test_cli_id_prompt_must_be_ints(capsys, no_tokenizer):
    rc, _, err = run_cli(capsys, "generate", "12 x")
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "'12 x'" in err and "space-separated ints" in err


def test_cli_without_tokenizer_prints_prompt_and_generation_apart(capsys, no_tokenizer,
                                                                  shipped):
    tok = shipped.tokenizer
    ids = tok.encode("12+30=")
    rc, out, err = run_cli(capsys, "generate", " ".join(map(str, ids)))
    assert rc == 0, err
    want = " ".join(map(str, ids)) + " -> " + " ".join(map(str, tok.encode("42")))
    assert out.strip().splitlines() == [want]


def test_cli_show_steps_animates_only_on_a_terminal(capsys, monkeypatch):
    rc, out, err = run_cli(capsys, "generate", "12+30=", "--show-steps")
    assert rc == 0, err
    assert "\x1b" not in out and "step 1/" in out  # captured: not a terminal
    assert out.strip().splitlines()[-1] == "12+30=42"
    monkeypatch.setattr(jmoe.cli.time, "sleep", lambda s: None)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    rc, out, err = run_cli(capsys, "generate", "12+30=", "--show-steps")
    assert rc == 0, err
    assert "\x1b[" in out and out.strip().splitlines()[-1] == "12+30=42"


def test_cli_gen_length_alone_and_bench_batch_honoured(capsys, monkeypatch):
    rc, out, err = run_cli(capsys, "generate", "12+30=", "--gen-length", "8")
    assert rc == 0, err
    sizes = []
    real = jmoe.generate

    def spy(model, prompts, **kw):
        sizes.append(len(prompts))
        return real(model, prompts, **kw)

    monkeypatch.setattr(jmoe, "generate", spy)
    rc, out, err = run_cli(capsys, "bench", "--batch", "2", "--repeats", "1")
    assert rc == 0, err
    assert sizes and set(sizes) == {2}


def test_cli_help_prints_real_defaults(capsys):
    rc, out, _ = run_cli(capsys, "generate", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    # --adaptive's budgets derive from the model (issue 16)
    for w in ("random seed, an int in [0, 2**64) (default: 0)",
              "(default: half the maximum, >= 1)", "(default: the model's top-k)",
              "The shipped model's generation config: gen_length 6, "
              "block_length 6, steps 6", "llada2 caps any value at gen-length"):
        assert w in flat, w
    rc, out, _ = run_cli(capsys, "bench", "--help")
    flat = " ".join(out.split())
    assert "prompts per call (default: 8)" in flat and "(default: 3)" in flat
