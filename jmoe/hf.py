"""Reading HF model folders: ``config.json``, ``generation_config.json`` and safetensors.

An HF folder becomes a jmoe config (``config_from_hf_dir``) and a params tree
(``read_params``) through the family's declarative key table (``jmoe.hf_keys``). The
weights are read tensor by tensor: each jmoe leaf is allocated once and filled from
HF tensors read one at a time (per-expert tensors into their slot of the stacked
``[E, ...]`` array); the source model is never held whole.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
from tqdm.auto import tqdm

from jmoe.config import CONFIG_CLASSES, TOKEN_ID_FIELDS, read_hf_config, read_json
from jmoe.hf_keys import ignored_keys, rules_for
from jmoe.model import abstract_params

HF_MODEL_TYPES = {"olmoe": "olmoe", "llada": "olmoe", "lladamoe": "olmoe", "llada_moe": "olmoe",
                  "llada2_moe": "llada2", "diffusion_gemma": "diffusion_gemma"}
# generation_config.json keys the sampler understands, and HF names mapped onto them
GENERATION_KEYS = ("gen_length", "block_length", "steps", "temperature", "cfg_scale",
                   "remasking", "threshold", "decoder", "low_threshold", "edit_threshold",
                   "max_post_steps", "credit_alpha", "credit_boost", "credit_decay", "top_k",
                   "top_p",
                   # DiffusionGemma's entropy-bound sampler (``sampler_config.entropy_bound``
                   # is read flat as ``entropy_bound``)
                   "canvas_length", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                   "stability_threshold", "confidence_threshold")
_HF_GENERATION_ALIASES = {"max_new_tokens": "gen_length", "editing_threshold": "edit_threshold"}
# generation_config.json keys that change nothing jmoe generates: metadata and output flags
_GENERATION_NO_EFFECT = ("_from_model_config", "transformers_version", "use_cache",
                         "output_attentions", "output_hidden_states", "output_scores",
                         "output_logits", "return_dict_in_generate", "bos_token_id",
                         "decoder_start_token_id", "cache_implementation", "cache_config",
                         "disable_compile")
_log = logging.getLogger("jmoe")


def require_folder(path: str, what: str = "HF folder") -> str:
    """``path`` as a str; FileNotFoundError if it does not exist, ValueError if it is a file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a file, not a folder: expected a model folder "
                         "(config.json + weights)")
    return path


def generation_defaults(folder: str, config=None) -> dict | None:
    """The sampler defaults of a folder's ``generation_config.json`` (None: no file or
    none set). Keys jmoe cannot honour (``do_sample``, ``top_p``, ``max_length``, ...; a
    token id other than ``config``'s) are ignored with a warning naming them."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings, got a JSON "
                         f"{type(raw).__name__}")
    out, ignored = {}, []
    sampler = raw.get("sampler_config")
    if isinstance(sampler, dict) and set(sampler) <= {"entropy_bound", "_cls_name"}:
        # transformers' EntropyBoundSamplerConfig, saved with its class name
        raw = {k: v for k, v in raw.items() if k != "sampler_config"}
        if "entropy_bound" in sampler:
            raw.setdefault("entropy_bound", sampler["entropy_bound"])
    for k, v in raw.items():
        if v is None:  # transformers writes unset fields as null
            continue
        name = _HF_GENERATION_ALIASES.get(k, k)
        if name in GENERATION_KEYS and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[name] = v
        elif k in TOKEN_ID_FIELDS and config is not None:
            ids = set(v) if isinstance(v, (list, tuple)) else {v}
            if ids != {getattr(config, k)}:
                ignored.append(f"{k}={v!r} (the model's {k} is {getattr(config, k)!r})")
        elif k not in _GENERATION_NO_EFFECT:
            ignored.append(f"{k}={v!r}")
    if ignored:
        _log.warning("%s: jmoe cannot honour %s; ignored (jmoe's generation keys: %s)", path,
                     ", ".join(ignored), ", ".join(GENERATION_KEYS + ("max_new_tokens",)))
    return out or None


def config_from_hf_dir(hf_dir: str, **overrides):
    """The jmoe config of an HF folder (``config.json`` + ``generation_config.json``).

    Errors in ``config.json`` are ValueErrors naming the file and the field; token ids
    given in ``overrides`` replace ``config.json``'s before they are checked.
    """
    hf_dir = require_folder(hf_dir)
    cfg_path = os.path.join(hf_dir, "config.json")
    hf = read_hf_config(hf_dir)
    model_type = hf.get("model_type")
    family = HF_MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(f"{cfg_path}: model_type={model_type!r}: expected one of "
                         f"{sorted(HF_MODEL_TYPES)}")
    ids = {k: overrides[k] for k in TOKEN_ID_FIELDS if k in overrides}
    try:
        config = CONFIG_CLASSES[family].from_hf_config(hf, **ids)
    except ValueError as e:
        msg = str(e)
        raise ValueError(cfg_path + msg[len("config.json"):] if msg.startswith("config.json")
                         else f"{cfg_path}: {msg}") from None
    gen = generation_defaults(hf_dir, config)
    if gen:  # the folder's generation_config.json refines the family's defaults
        config = config.replace(generation={**(config.generation or {}), **gen})
    return config.replace(**overrides) if overrides else config


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "float32":
        return np.dtype(np.float32)
    raise ValueError(f"dtype={name!r}: expected 'float32' or 'bfloat16'")


def _open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        # pread: tensor bytes are read on demand, not mapped; a mapped shard's pages
        # would stay resident (and count in RSS) until the whole file is closed
        return safe_open(path, framework="numpy", backend="pread")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsReader:
    """Reads named tensors from a folder's ``model.safetensors`` or sharded index.

    A damaged, empty or tensor-less file, or an index naming what its shards lack, is a
    ValueError naming the file; a missing file a FileNotFoundError.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._stack = contextlib.ExitStack()
        self._handles = {}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            self.key_to_file = _weight_map(index)
            for shard in sorted(set(self.key_to_file.values())):
                if not os.path.isfile(os.path.join(hf_dir, shard)):
                    raise FileNotFoundError(
                        f"shard {shard!r} named in {index} is missing from {hf_dir!r}")
        elif os.path.isfile(single):
            with _open_safetensors(single) as f:
                self.key_to_file = {k: "model.safetensors" for k in f.keys()}
            if not self.key_to_file:
                raise ValueError(f"{single}: holds no tensors: expected the model's weights")
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {hf_dir!r}")

    def keys(self):
        return self.key_to_file.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(key).get_slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def slice(self, key: str):
        """``safe_open``'s lazy slice of ``key``: ``slice(key)[a:b]`` reads rows a:b only."""
        return self._handle(key).get_slice(key)

    def _handle(self, key):
        if key not in self.key_to_file:
            raise KeyError(key)
        fname = self.key_to_file[key]
        if fname not in self._handles:
            path = os.path.join(self.hf_dir, fname)
            handle = self._stack.enter_context(_open_safetensors(path))
            lacking = sorted({k for k, f in self.key_to_file.items() if f == fname}
                             - set(handle.keys()))
            if lacking:
                raise ValueError(f"{path}: lacks tensor(s) {lacking[:5]} that its index places "
                                 "there")
            self._handles[fname] = handle
        return self._handles[fname]

    def close(self):
        self._stack.close()


def _weight_map(index: str) -> dict:
    raw = read_json(index)
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map' of tensor name "
                         "-> shard file")
    if not wm:
        raise ValueError(f"{index}: its weight_map names no tensors: expected the model's weights")
    return dict(wm)


# safetensors dtype names -> numpy/jmoe names
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def declared_dtype(hf_dir: str) -> str | None:
    """The dtype ``config.json`` declares for the weights (``dtype``, or the older
    ``torch_dtype``), or None."""
    path = os.path.join(hf_dir, "config.json")
    hf = read_hf_config(path) if os.path.isfile(path) else {}
    names = {str(hf[k]).removeprefix("torch.") for k in ("dtype", "torch_dtype")
             if hf.get(k) not in (None, "auto")}
    if len(names) > 1:
        raise ValueError(f"{path}: dtype={hf['dtype']!r} and torch_dtype={hf['torch_dtype']!r} "
                         "disagree: expected one weight dtype")
    return names.pop() if names else None


def source_dtype(reader: SafetensorsReader, keys=None, declared: str | None = None) -> str:
    """The jmoe dtype of the weights ``keys`` (default all): exactly the stored one.

    Weights stored as float32 or bfloat16 keep their precision. Float16 or float64
    weights, weights of mixed dtypes, or a ``declared`` (config.json) dtype other than the
    weights' are ValueErrors naming the dtypes and a tensor: jmoe never changes a
    checkpoint's precision unasked (pass ``dtype`` to convert).
    """
    first: dict[str, str] = {}
    for k in keys if keys is not None else reader.keys():
        first.setdefault(_dtype_name(reader, k), k)
    if len(first) > 1:
        mix = ", ".join(f"{d} ({k!r})" for d, k in first.items())
        raise ValueError(f"the weights in {reader.hf_dir!r} mix dtypes {mix}: pass "
                         "dtype='float32' or dtype='bfloat16' (--dtype) to convert them to one")
    (name, key), = first.items()
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"the weights in {reader.hf_dir!r} are {name} (e.g. {key!r}): jmoe "
                         "computes in float32 or bfloat16 and does not change a checkpoint's "
                         "precision unasked: pass dtype='float32' or dtype='bfloat16' "
                         "(--dtype) to convert")
    if declared is not None and declared != name:
        raise ValueError(f"{os.path.join(reader.hf_dir, 'config.json')} declares dtype="
                         f"{declared!r} but the weights are {name} (e.g. {key!r}): pass "
                         "dtype='float32' or dtype='bfloat16' (--dtype) to choose")
    return name


def _dtype_name(reader, key) -> str:
    st = reader.dtype(key)
    if st not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r} in {reader.hf_dir!r} has dtype {st}: expected floating "
                         f"weights ({', '.join(_SAFETENSORS_DTYPES)})")
    return _SAFETENSORS_DTYPES[st]


def _set_path(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def open_params(hf_dir: str, config, dtype: str | None = None) -> tuple[SafetensorsReader, str]:
    """Check an HF folder's tensors against ``config`` before any weight is read.

    Returns the open reader and the jmoe dtype the weights will have (``dtype``, or
    None: the weights' own, ``source_dtype``). Raises ValueError naming the tensor for
    a missing or unexpected tensor, or the dtypes for weights jmoe will not convert
    unasked. The caller closes the reader.
    """
    reader = SafetensorsReader(hf_dir)
    try:
        rules = rules_for(config)
        wanted = {k for r in rules for k in r.hf_keys(config.num_experts)}
        skipped = ignored_keys(config, reader.keys())
        unexpected = sorted(set(reader.keys()) - wanted - skipped)
        if unexpected:
            raise ValueError(f"unexpected tensor(s) in {hf_dir!r} for {config.family}: "
                             f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        vision = sorted(k for k in skipped if ".vision_tower." in k or ".embed_vision." in k)
        if vision:
            _log.warning("%s: %d vision-tower tensors skipped: jmoe loads DiffusionGemma's text "
                         "model only (image inputs are refused)", hf_dir, len(vision))
        missing = sorted(wanted - set(reader.keys()))
        if missing:
            raise ValueError(f"missing tensor(s) in {hf_dir!r}: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        # the model's dtype is the weights' own (float32 leaves such as expert_bias aside)
        model_keys = sorted({k for r in rules if not r.float32
                             for k in r.hf_keys(config.num_experts)})
        if dtype is None:
            dtype = source_dtype(reader, model_keys, declared_dtype(hf_dir))
        else:  # converted because asked; still only from floating weights
            np_dtype(dtype)
            for k in model_keys:
                _dtype_name(reader, k)
        return reader, dtype
    except BaseException:
        reader.close()
        raise


def leaf_nbytes(config, dtype: str) -> int:
    """Bytes of the whole params tree of ``config`` in ``dtype`` (float32 leaves kept)."""
    shapes, out_dt = abstract_params(config), np_dtype(dtype)
    return sum(int(np.prod(get_path(shapes, r.path))) *
               (4 if r.float32 else out_dt.itemsize) for r in rules_for(config))


def iter_params(reader: SafetensorsReader, config, dtype: str, progress: bool = True,
                desc: str = "converting"):
    """Yield ``(path, leaf)`` for every jmoe params leaf, one leaf in memory at a time.

    Each leaf (a NumPy array in ``dtype``; float32 for ``Rule.float32`` leaves such as
    LLaDA2's ``expert_bias``) is allocated once and filled from its HF tensors, read
    one at a time with ``safe_open`` (per-expert tensors into their slot of the
    stacked ``[E, ...]`` array). Only the leaf being built and the one HF tensor being
    copied are held: the caller drops each leaf before asking for the next. The
    progress bar counts bytes of leaves (GB/s) and tensors. Raises ValueError naming
    a mis-shaped tensor.
    """
    rules = rules_for(config)
    shapes = abstract_params(config)
    out_dt = np_dtype(dtype)
    n_tensors = sum(len(r.hf_keys(config.num_experts)) for r in rules)
    bar = tqdm(total=leaf_nbytes(config, dtype), desc=desc, unit="B", unit_scale=True,
               unit_divisor=1024, disable=not progress)
    done = 0
    try:
        for rule in rules:
            target = get_path(shapes, rule.path)
            leaf = np.empty(target, np.float32 if rule.float32 else out_dt)
            want = target[1:] if rule.per_expert else target
            for e, key in enumerate(rule.hf_keys(config.num_experts)):
                dest = leaf[e] if rule.per_expert else leaf
                _copy_rows(reader, key, rule, want, dest)
                done += 1
            bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            bar.update(leaf.nbytes)
            yield rule.path, leaf
            del leaf
    finally:
        bar.close()


# bytes of one HF tensor copied at a time (a row block of ``safe_open``'s slice).
# Measured with safetensors 0.8: a slice of the ``pread`` backend still reads the
# whole tensor transiently, so a tensor can be held twice for an instant (0.6 GB for
# LLaDA2's embedding); the row blocks keep the transposed copies small.
READ_BYTES = 64 << 20


def _copy_rows(reader, key, rule, want, dest):
    """Copy HF tensor ``key`` (its ``rule.rows`` if fused, transposed if ``rule.transpose``)
    into ``dest``, ``READ_BYTES`` of rows at a time; ValueError if its shape is not ``want``."""
    shape = reader.shape(key)
    if rule.stacked and len(shape) == 3:  # [E, R, C]: rows of axis 1, swap the last two
        lo, hi = rule.rows if rule.rows is not None else (0, shape[1])
        got = (shape[0], max(0, min(hi, shape[1]) - lo), shape[2])
        got = (got[0], got[2], got[1]) if rule.transpose else got
        if got != tuple(want):
            raise ValueError(f"tensor {key!r} has shape {tuple(shape)}, expected rows "
                             f"{lo}:{hi} of axis 1 to give {tuple(want)}")
        _copy_stacked(reader, key, rule, shape, dest)
        return
    lo, hi = rule.rows if rule.rows is not None else (0, shape[0] if shape else 0)
    got = (max(0, min(hi, shape[0]) - lo),) + tuple(shape[1:]) if shape else ()
    got = tuple(reversed(got)) if rule.transpose else got
    if got != tuple(want):
        part = "" if rule.rows is None else f" rows {rule.rows[0]}:{rule.rows[1]}"
        hf_want = tuple(reversed(want)) if rule.transpose else tuple(want)
        raise ValueError(f"tensor {key!r}{part} has shape {tuple(shape)}, expected {hf_want}")
    if len(shape) < 2:
        dest[...] = reader.read(key)[lo:hi] if rule.rows is not None else reader.read(key)
        return
    sl = reader.slice(key)
    row_bytes = int(np.prod(shape[1:])) * 4
    step = max(1, READ_BYTES // max(row_bytes, 1))
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        block = sl[a:b]
        if rule.transpose:
            dest[:, a - lo:b - lo] = block.T
        else:
            dest[a - lo:b - lo] = block
        del block


def _copy_stacked(reader, key, rule, shape, dest):
    """An expert-stacked HF tensor ``[E, R, C]`` (its rows ``rule.rows`` of axis 1), one
    expert at a time, transposed to ``[E, C, R]`` when ``rule.transpose``."""
    if len(shape) != 3:
        raise ValueError(f"tensor {key!r} has shape {tuple(shape)}: expected [experts, rows, "
                         "cols]")
    lo, hi = rule.rows if rule.rows is not None else (0, shape[1])
    sl = reader.slice(key)
    for e in range(shape[0]):
        block = sl[e:e + 1, lo:hi][0]
        dest[e] = block.T if rule.transpose else block
        del block


def read_params(hf_dir: str, config, dtype: str | None = None, progress: bool = True,
                place=None):
    """HF folder -> jmoe params (a nested dict of arrays in ``dtype``).

    ``dtype`` None keeps the weights' own (``source_dtype``: float32 or bfloat16,
    else refused); ``"float32"`` or ``"bfloat16"`` converts them. ``place``, if given,
    maps each NumPy leaf as soon as it is read, called as ``place(path, leaf)`` with the
    leaf's params path (e.g. ``jax.device_put`` onto the leaf's sharding: the NumPy copy
    is dropped at once, so the tree is never held twice). Raises ValueError naming the
    tensor for a missing, unexpected or mis-shaped tensor. Expected shapes come from
    ``init_params`` of the config (abstractly).
    """
    reader, dtype = open_params(hf_dir, config, dtype)
    try:
        params: dict = {}
        for path, leaf in iter_params(reader, config, dtype, progress):
            _set_path(params, path, leaf if place is None else place(path, leaf))
            del leaf
        return params, dtype
    finally:
        reader.close()


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


