"""jmoe checkpoints (orbax params + JSON config + tokenizer files) and ``jmoe.load``.

A jmoe checkpoint folder holds ``config.json`` (the jmoe config, with a
``family`` key), ``params/`` (an orbax checkpoint) and the tokenizer and
generation files copied from the HF folder it came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from jmoe.config import CONFIG_CLASSES
from jmoe.hf import config_from_hf_dir, read_params
from jmoe import sharding
from jmoe.model import Model, abstract_params, param_logical_axes

# the small trained model shipped inside the package (see its README.md)
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
def config_from_dict(d: dict):
    d = dict(d)
    family = d.pop("family", None)
    if family not in CONFIG_CLASSES:
        raise ValueError(f"config.json family={family!r}: expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[family](**d)


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


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def save_checkpoint(folder: str, config, params) -> None:
    """Write ``config.json`` and ``params/`` into an existing, empty ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    ckptr = _orbax().StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(folder, "params")), params)
    ckptr.wait_until_finished()


def _restore_params(folder: str, config, mesh=None):
    target = abstract_params(config, as_struct=True)
    if mesh is not None:  # restore each leaf straight into its shards (no full host copy)
        shardings = sharding.param_shardings(param_logical_axes(config), mesh,
                                             num_experts=config.num_experts)
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                              target, shardings)
    ckptr = _orbax().StandardCheckpointer()
    return ckptr.restore(os.path.abspath(os.path.join(folder, "params")), target)


def _load_tokenizer(folder: str):
    from jmoe.tokenizer import FILENAME, CharTokenizer

    if os.path.isfile(os.path.join(folder, FILENAME)):
        return CharTokenizer.load(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# leaves that stay float32 whatever the model dtype
FLOAT32_LEAVES = ("expert_bias",)


def cast_params(params, dtype: str):
    dt = jnp.dtype(dtype)

    def cast(path, a):
        name = getattr(path[-1], "key", None)
        if name in FLOAT32_LEAVES or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def load(path: str | os.PathLike | None = None, *, tokenizer: bool = True,
         **config_overrides: Any) -> Model:
    """Open a jmoe checkpoint, or an HF folder (converted in memory); no path: the
    small trained default model shipped with jmoe.

    ``config_overrides`` replace config fields for this load (an unknown field is
    a ValueError), e.g. ``causal=False``, ``mask_token_id=...``, ``dtype=...``,
    ``moe_backend=...``, ``routing="expert_choice"`` with ``capacity_factor=...`` (either
    family). ``mesh=jmoe.make_mesh(...)`` returns params already placed
    on it (routed experts on ``expert``, the rest replicated) and runs the MoE
    layers expert-parallel; ``ep_capacity_factor`` sets its buffer policy.

    Example:
        model = jmoe.load("ckpt/olmoe", dtype="float32")
    """
    if path is None:
        path = DEFAULT_MODEL_DIR
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"the shipped default model is missing from {path!r}")
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a jmoe checkpoint or an "
                                "HF model folder")
    with open(cfg_path) as f:
        raw = json.load(f)
    if "family" in raw:
        config = config_from_dict(raw)
        params = _restore_params(path, config, config_overrides.get("mesh"))
    else:
        config = config_from_hf_dir(path)
        params, dtype = read_params(path, config, config_overrides.get("dtype"), progress=False)
        config = config.replace(dtype=dtype)
        if config_overrides.get("mesh") is not None:  # host arrays straight into their shards
            params = sharding.shard_params(params, param_logical_axes(config),
                                           config_overrides["mesh"], num_experts=config.num_experts)
        else:
            params = jax.tree.map(jnp.asarray, params)
    if config_overrides:
        new = config.replace(**config_overrides)
        if new.dtype != config.dtype:
            params = cast_params(params, new.dtype)
        config = new
    if config.mesh is not None:  # a no-op for leaves already placed
        params = sharding.shard_params(params, param_logical_axes(config), config.mesh,
                                       num_experts=config.num_experts)
    tok = _load_tokenizer(path) if tokenizer else None
    return Model(config, params, tok)
