"""Reading HF model folders: ``config.json``, ``generation_config.json`` and safetensors.

An HF folder becomes a jmoe config (``config_from_hf_dir``) and a params tree
(``read_params``) through the family's declarative key table (``jmoe.hf_keys``). The
weights are read tensor by tensor: each jmoe leaf is allocated once and filled from
HF tensors read one at a time (per-expert tensors into their slot of the stacked
``[E, ...]`` array); the source model is never held whole.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
from tqdm.auto import tqdm

from jmoe.config import CONFIG_CLASSES, read_hf_config
from jmoe.hf_keys import rules_for
from jmoe.model import abstract_params

HF_MODEL_TYPES = {"olmoe": "olmoe", "llada": "olmoe", "lladamoe": "olmoe", "llada_moe": "olmoe",
                  "llada2_moe": "llada2"}
# generation_config.json keys the sampler understands, and HF names mapped onto them
GENERATION_KEYS = ("gen_length", "block_length", "steps", "temperature", "cfg_scale",
                   "remasking", "threshold")
_HF_GENERATION_ALIASES = {"max_new_tokens": "gen_length"}


def generation_defaults(folder: str) -> dict | None:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for k, v in raw.items():
        k = _HF_GENERATION_ALIASES.get(k, k)
        if k in GENERATION_KEYS and isinstance(v, (int, float, str)):
            out[k] = v
    return out or None


def config_from_hf_dir(hf_dir: str, **overrides):
    """The jmoe config of an HF folder (``config.json`` + ``generation_config.json``)."""
    hf = read_hf_config(hf_dir)
    model_type = hf.get("model_type")
    family = HF_MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(f"config.json model_type={model_type!r} in {hf_dir!r}: expected one of "
                         f"{sorted(HF_MODEL_TYPES)}")
    config = CONFIG_CLASSES[family].from_hf_config(hf)
    gen = generation_defaults(hf_dir)
    if gen and "generation" not in overrides:
        # the folder's generation_config.json refines the family's defaults
        overrides = dict(overrides, generation={**(config.generation or {}), **gen})
    return config.replace(**overrides) if overrides else config


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
            target = get_path(shapes, rule.path)
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


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


