"""HF safetensors <-> jmoe checkpoints, streamed tensor by tensor, written atomically.

Reading an HF folder is ``jmoe.hf`` (also what ``jmoe.load`` of an HF folder uses);
this module writes: the orbax checkpoint of a converted folder, and HF safetensors
shards back from a jmoe checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
from tqdm.auto import tqdm

from jmoe.checkpoint import (atomic_dir, check_matches_weights, expected_params,
                             open_stored, save_checkpoint_streaming)
from jmoe.config import TOKEN_ID_FIELDS, read_json
from jmoe.hf import config_from_hf_dir, get_path, iter_params, open_params, require_folder
from jmoe.hf_keys import hf_config_from, rules_for

# Files besides weights that travel with a checkpoint (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "added_tokens.json", "generation_config.json", "chat_template.jinja")
MAX_SHARD_BYTES = 4 << 30
EXPORT_SHARD_BYTES = 1 << 30  # jmoe_to_hf holds one shard: its memory bound


def iter_hf_tensors(params, config):
    """(hf_key, array) pairs of a jmoe params tree, in key-table order.

    Row-sliced rules (a fused projection) are concatenated back into one tensor.
    """
    pending: dict[str, list] = {}
    for rule in rules_for(config):
        leaf = np.asarray(get_path(params, rule.path))
        for e, key in enumerate(rule.hf_keys(config.num_experts)):
            t = leaf[e] if rule.per_expert else leaf
            if rule.stacked:  # [E, ...]: transpose swaps the last two axes
                t = np.swapaxes(t, 1, 2) if rule.transpose else t
            else:
                t = t.T if rule.transpose else t
            if rule.rows is None:
                yield key, np.ascontiguousarray(t)
                continue
            pending.setdefault(key, []).append((rule.rows, t))
            parts = sorted(pending[key], key=lambda p: p[0])
            if sum(b - a for (a, b), _ in parts) == _fused_rows(config, key):
                axis = 1 if rule.stacked else 0
                yield key, np.ascontiguousarray(np.concatenate([p for _, p in parts], axis))
                del pending[key]


def _fused_rows(config, key: str) -> int:
    if key.endswith("query_key_value.weight"):
        return (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    if key.endswith("experts.gate_up_proj"):
        return 2 * config.moe_intermediate_size
    raise ValueError(f"no fused layout known for {key!r}")


def copy_side_files(src: str, dst: str):
    for name in SIDE_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):  # contents only: the copy's mode follows the umask
            shutil.copyfile(p, os.path.join(dst, name))


def hf_to_jmoe(hf_dir: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
               progress: bool = True, **config_overrides) -> str:
    """Convert an HF folder into a jmoe checkpoint at ``out`` (atomic).

    ``out`` is checked before any weight is read (``jmoe.checkpoint.atomic_dir``): it
    must not be, contain or sit inside ``hf_dir``, must not exist unless ``overwrite``,
    and must be creatable. Work in progress goes to a hidden ``.OUT.partial-*`` folder
    beside ``out`` (the previous ``out`` to ``.OUT.old-*`` during an overwrite's swap);
    the next run to ``out`` removes those a killed run left. ``dtype`` None keeps the
    weights' own precision (float32 or bfloat16; float16 weights need ``dtype``).
    ``config_overrides`` must keep every weight's shape (``jmoe.load``'s rule).

    Memory: streamed. Each params leaf is built from its HF tensors (``jmoe.hf.iter_params``)
    and written in 64 MiB parts with orbax's partial save
    (``jmoe.checkpoint.save_checkpoint_streaming``): peak resident memory is at most
    2 GiB plus the largest tensor whatever the model size (measured in
    ``tests/test_scale_memory.py`` and ``benchmarks/real_scale.py``). The progress bar
    counts bytes (GB/s) and tensors.

    Example:
        hf_to_jmoe("hf/OLMoE-1B-7B-0924", "ckpt/olmoe", dtype="bfloat16")
    """
    hf_dir = require_folder(hf_dir)
    with atomic_dir(out, overwrite, sources=[hf_dir]) as tmp:
        ids = {k: config_overrides[k] for k in TOKEN_ID_FIELDS if k in config_overrides}
        config = config_from_hf_dir(hf_dir, **ids)
        config = check_matches_weights(config, config_overrides, expected_params(config), hf_dir)
        reader, dtype = open_params(hf_dir, config, dtype)
        try:  # streamed: one part of the params in memory at a time
            save_checkpoint_streaming(tmp, config.replace(dtype=dtype),
                                      iter_params(reader, config, dtype, progress))
        finally:
            reader.close()
        copy_side_files(hf_dir, tmp)
        shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(tmp, "hf_config.json"))
    return out


def jmoe_to_hf(ckpt: str, out: str, *, overwrite: bool = False, progress: bool = True,
               shard_bytes: int = EXPORT_SHARD_BYTES) -> str:
    """Export a jmoe checkpoint back to an HF folder (safetensors shards + config); ``out``
    is checked and written as by ``hf_to_jmoe``.

    Memory: streamed. One params leaf is restored at a time
    (``jmoe.checkpoint.StoredParams``) and one shard of at most ``shard_bytes``
    (default ``EXPORT_SHARD_BYTES``, 1 GiB; the HF index lists the shards) is held
    before it is written, so the peak is about ``shard_bytes`` plus the largest leaf
    whatever the model size (``tests/test_scale_memory.py``).
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard_bytes={shard_bytes!r}: expected a positive int (bytes)")
    ckpt = require_folder(ckpt, "jmoe checkpoint")
    with atomic_dir(out, overwrite, sources=[ckpt]) as tmp:
        config, params = open_stored(ckpt)
        hf_cfg_path = os.path.join(ckpt, "hf_config.json")
        base = read_json(hf_cfg_path) if os.path.isfile(hf_cfg_path) else None
        if base is not None and not isinstance(base, dict):
            raise ValueError(f"{hf_cfg_path}: expected a JSON object, got {type(base).__name__}")
        _write_shards(tmp, iter_hf_tensors(params, config), progress, shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from(config, base), f, indent=2)
        copy_side_files(ckpt, tmp)
    return out


def _write_shards(folder: str, tensors, progress: bool, max_bytes: int = MAX_SHARD_BYTES):
    """Write (key, array) pairs as safetensors shards of at most ``max_bytes``.

    One shard is ``model.safetensors``; more get the HF index. Only one shard's
    tensors are held at a time.
    """
    from safetensors.numpy import save_file

    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for key, t in tqdm(tensors, desc="exporting", unit="tensor", disable=not progress):
        if size + t.nbytes > max_bytes:
            flush()
        current[key] = t
        size += t.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(folder, shards[0][0]), os.path.join(folder, "model.safetensors"))
        return
    n = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, name), os.path.join(folder, final))
        weight_map.update({k: final for k in keys})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


# -- the command line, shared by ``jmoe convert`` and ``python -m checkpoints_convert`` --

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--hf-dir", help="HF model folder (config.json + safetensors) to convert")
    p.add_argument("--out", required=True,
                   help="output folder (written atomically; work in progress in a hidden "
                        ".OUT.partial-* folder beside it, removed by the next run if killed)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="param dtype of the jmoe checkpoint (default: the source's own, "
                        "float32 or bfloat16; float16 sources need it)")
    p.add_argument("--to-hf", metavar="JMOE_DIR",
                   help="export the jmoe checkpoint JMOE_DIR back to the HF layout at --out")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    progress = not args.quiet
    if args.to_hf:
        if args.hf_dir:
            raise ValueError("pass either --hf-dir (HF -> jmoe) or --to-hf (jmoe -> HF), not both")
        jmoe_to_hf(args.to_hf, args.out, overwrite=args.overwrite, progress=progress)
    else:
        if not args.hf_dir:
            raise ValueError("--hf-dir is required (or --to-hf JMOE_DIR to export)")
        hf_to_jmoe(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                   progress=progress)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description="Convert HF OLMoE / LLaDA-MoE checkpoints to jmoe (orbax) and back."))
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
