"""HF safetensors <-> jmoe params, streamed tensor by tensor, written atomically.

Peak memory stays near the output size: each jmoe leaf is allocated once and
filled from HF tensors read one at a time (per-expert tensors into their slot of
the stacked ``[E, ...]`` array); the source model is never held whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
from tqdm.auto import tqdm

from checkpoints_convert.keys import hf_config_from, rules_for

# Files besides weights that travel with a checkpoint (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "added_tokens.json", "generation_config.json", "chat_template.jinja")
MAX_SHARD_BYTES = 4 << 30


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "float32":
        return np.dtype(np.float32)
    raise ValueError(f"dtype={name!r}: expected 'float32' or 'bfloat16'")


class SafetensorsReader:
    """Reads named tensors from a folder's ``model.safetensors`` or sharded index."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(hf_dir, shard)):
                    raise FileNotFoundError(
                        f"shard {shard!r} named in {index} is missing from {hf_dir!r}")
            self.key_to_file = dict(weight_map)
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="numpy") as f:
                self.key_to_file = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {hf_dir!r}")
        self._stack = contextlib.ExitStack()
        self._handles = {}

    def keys(self):
        return self.key_to_file.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(key).get_slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def _handle(self, key):
        from safetensors import safe_open

        if key not in self.key_to_file:
            raise KeyError(key)
        fname = self.key_to_file[key]
        if fname not in self._handles:
            self._handles[fname] = self._stack.enter_context(
                safe_open(os.path.join(self.hf_dir, fname), framework="numpy"))
        return self._handles[fname]

    def close(self):
        self._stack.close()


def source_dtype(reader: SafetensorsReader) -> str:
    """jmoe dtype matching the checkpoint: bfloat16 for 16-bit weights, else float32."""
    first = next(iter(reader.keys()))
    return "bfloat16" if reader.dtype(first) in ("BF16", "F16") else "float32"


def _set_path(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def read_params(hf_dir: str, config, dtype: str | None = None, progress: bool = True):
    """HF folder -> jmoe params (a nested dict of NumPy arrays in ``dtype``).

    Raises ValueError naming the tensor for a missing, unexpected or mis-shaped
    tensor. Expected shapes come from ``init_params`` of the config (abstractly).
    """
    from jmoe.model import abstract_params

    reader = SafetensorsReader(hf_dir)
    try:
        dtype = dtype or source_dtype(reader)
        out_dt = np_dtype(dtype)
        rules = rules_for(config)
        shapes = abstract_params(config)
        wanted = {k for r in rules for k in r.hf_keys(config.num_experts)}
        unexpected = sorted(set(reader.keys()) - wanted - _ignored_keys(config))
        if unexpected:
            raise ValueError(f"unexpected tensor(s) in {hf_dir!r} for {config.family}: "
                             f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        missing = sorted(wanted - set(reader.keys()))
        if missing:
            raise ValueError(f"missing tensor(s) in {hf_dir!r}: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        params: dict = {}
        bar = tqdm(total=len(rules), desc="converting", unit="tensor", disable=not progress)
        for rule in rules:
            target = _get_path(shapes, rule.path)
            leaf = np.empty(target, np.float32 if rule.float32 else out_dt)
            for e, key in enumerate(rule.hf_keys(config.num_experts)):
                t = reader.read(key)
                if rule.rows is not None:
                    t = t[rule.rows[0]:rule.rows[1]]
                t = t.T if rule.transpose else t
                want = target[1:] if rule.per_expert else target
                if tuple(t.shape) != tuple(want):
                    part = "" if rule.rows is None else f" rows {rule.rows[0]}:{rule.rows[1]}"
                    hf_want = tuple(reversed(want)) if rule.transpose else tuple(want)
                    raise ValueError(f"tensor {key!r}{part} has shape "
                                     f"{tuple(reader.shape(key))}, expected {hf_want}")
                if rule.per_expert:
                    leaf[e] = t
                else:
                    leaf[...] = t
            bar.update(1)
            _set_path(params, rule.path, leaf)
        bar.close()
        return params, dtype
    finally:
        reader.close()


def _ignored_keys(config):
    # tied checkpoints may still carry lm_head.weight; rotary caches are not params
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def iter_hf_tensors(params, config):
    """(hf_key, array) pairs of a jmoe params tree, in key-table order.

    Row-sliced rules (a fused projection) are concatenated back into one tensor.
    """
    pending: dict[str, list] = {}
    for rule in rules_for(config):
        leaf = np.asarray(_get_path(params, rule.path))
        for e, key in enumerate(rule.hf_keys(config.num_experts)):
            t = leaf[e] if rule.per_expert else leaf
            t = t.T if rule.transpose else t
            if rule.rows is None:
                yield key, np.ascontiguousarray(t)
                continue
            pending.setdefault(key, []).append((rule.rows, t))
            parts = sorted(pending[key], key=lambda p: p[0])
            if sum(b - a for (a, b), _ in parts) == _fused_rows(config, key):
                yield key, np.ascontiguousarray(np.concatenate([p for _, p in parts]))
                del pending[key]


def _fused_rows(config, key: str) -> int:
    if key.endswith("query_key_value.weight"):
        return (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    raise ValueError(f"no fused layout known for {key!r}")


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False):
    """Yield a temp folder beside ``out``; it becomes ``out`` only if the body succeeds."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output {out!r} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: str, dst: str):
    for name in SIDE_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))


def hf_to_jmoe(hf_dir: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
               progress: bool = True, **config_overrides) -> str:
    """Convert an HF folder into a jmoe checkpoint at ``out`` (atomic).

    Example:
        hf_to_jmoe("hf/OLMoE-1B-7B-0924", "ckpt/olmoe", dtype="bfloat16")
    """
    from jmoe.checkpoint import config_from_hf_dir, save_checkpoint

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF folder {hf_dir!r} does not exist")
    config = config_from_hf_dir(hf_dir, **config_overrides)
    params, dtype = read_params(hf_dir, config, dtype, progress)
    config = config.replace(dtype=dtype)
    with atomic_dir(out, overwrite) as tmp:
        save_checkpoint(tmp, config, params)
        copy_side_files(hf_dir, tmp)
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(tmp, "hf_config.json"))
    return out


def jmoe_to_hf(ckpt: str, out: str, *, overwrite: bool = False, progress: bool = True) -> str:
    """Export a jmoe checkpoint back to an HF folder (safetensors shards + config)."""
    from jmoe.checkpoint import load

    model = load(ckpt, tokenizer=False)
    base = None
    hf_cfg_path = os.path.join(ckpt, "hf_config.json")
    if os.path.isfile(hf_cfg_path):
        with open(hf_cfg_path) as f:
            base = json.load(f)
    with atomic_dir(out, overwrite) as tmp:
        _write_shards(tmp, iter_hf_tensors(model.params, model.config), progress)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from(model.config, base), f, indent=2)
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
