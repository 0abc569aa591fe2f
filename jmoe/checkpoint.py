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

    Args:
        path: a folder (str or ``os.PathLike``), or None (default: the shipped default
            model). A jmoe checkpoint (``config.json`` with a ``family`` key and an
            orbax ``params/``) is restored; an HF folder (``config.json`` of a
            supported ``model_type``: ``olmoe``, ``llada``/``lladamoe``,
            ``llada2_moe``; ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``) is read tensor by tensor (``jmoe.hf``),
            its ``generation_config.json`` refining the generation defaults.
        tokenizer: bool, default True: load the folder's tokenizer (jmoe's character
            tokenizer, or ``transformers.AutoTokenizer`` when HF tokenizer files are
            there; None when there are none). False: ``Model.tokenizer`` is None.
        **config_overrides: config fields replaced for this load, e.g.
            ``dtype="float32" | "bfloat16"`` (params cast, float32 ``expert_bias``
            kept; default the checkpoint's, for an HF folder bfloat16 when its weights
            are 16-bit, else float32), ``causal=False``, ``attention_block_length=N``
            (block-causal attention; a bidirectional model then generates with the
            llada2 convention, blocks of N and the exact K/V cache), ``mask_token_id``,
            ``moe_backend``, ``routing="expert_choice"`` with ``capacity_factor``,
            ``generation={...}``. ``mesh=jmoe.make_mesh(...)`` restores the params
            straight into their shards (routed experts split over ``expert``, the rest
            replicated) and runs the MoE layers expert-parallel; ``ep_capacity_factor``
            (None: dropless, or a float > 0) sets its buffer policy.

    Returns:
        ``jmoe.Model(config, params, tokenizer)``: the frozen config with the
        overrides, the params pytree of jax arrays (placed on ``mesh`` if given) and
        the tokenizer or None.

    Raises:
        FileNotFoundError: no ``config.json`` in ``path`` (or the shipped model is
            missing); an HF folder with neither ``model.safetensors`` nor
            ``model.safetensors.index.json``, or without a shard its index names.
        ValueError: a jmoe ``config.json`` whose ``family`` is unknown; an HF
            ``model_type`` jmoe does not read, or a setting it does not implement
            (an activation other than SiLU, attention or linear biases, RoPE
            scaling, ...); a missing, unexpected or mis-shaped HF tensor (named); an
            unknown override field (named) or a value the config rejects (``dtype``
            not float32/bfloat16, ``attention_block_length`` with ``causal=True``,
            ...); ``num_experts`` not divisible by the mesh's ``expert`` axis.

    Orbax's and transformers' own errors surface unchanged for a damaged ``params/``
    or tokenizer (``tokenizer=False`` skips the tokenizer).

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
