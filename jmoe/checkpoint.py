"""jmoe checkpoints (orbax params + JSON config + tokenizer files) and ``jmoe.load``.

A jmoe checkpoint folder holds ``config.json`` (the jmoe config, with a
``family`` key), ``params/`` (an orbax checkpoint) and the tokenizer and
generation files copied from the HF folder it came from.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.config import CONFIG_CLASSES, TOKEN_ID_FIELDS, read_json
from jmoe.hf import config_from_hf_dir, get_path, read_params, require_folder
from jmoe import platform as platform_lib
from jmoe import sharding
from jmoe.model import Model, abstract_params, param_logical_axes

# the small trained model shipped inside the package (see its README.md)
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

_log = logging.getLogger("jmoe")


def config_from_dict(d: dict, source: str | None = None):
    """A jmoe config from its dict (a checkpoint's ``config.json``, named ``source`` in
    errors): an unknown family or field, or a rejected value, is a ValueError."""
    where = f"{source}: " if source else ""
    if not isinstance(d, dict):
        raise ValueError(f"{where}expected a JSON object of config fields, got {type(d).__name__}")
    d = dict(d)
    family = d.pop("family", None)
    if family not in CONFIG_CLASSES:
        raise ValueError(f"{where}family={family!r}: expected one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[family]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        what = "; ".join(f"{kind} field(s) {names}" for kind, names in
                         (("unknown", unknown), ("missing", missing)) if names)
        raise ValueError(f"{where}{what} for the {family} family: expected its config fields")
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


# -- writing an output folder atomically --

_HOST = socket.gethostname()


def _work_name(base: str, kind: str) -> str:
    """A hidden work folder of ``base`` that records its owner: ``.BASE.KIND-PID@HOST-RAND``."""
    return f".{base}.{kind}-{os.getpid()}@{_HOST}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell: never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_kind(name: str, base: str) -> str | None:
    """``"partial"`` or ``"old"`` if ``name`` is a work folder of ``base`` whose run is gone:
    a process of this machine that no longer exists, or a name of an earlier jmoe that
    recorded no owner."""
    for kind in ("partial", "old"):
        prefix = f".{base}.{kind}-"
        if name.startswith(prefix):
            owner = name[len(prefix):].rpartition("-")[0]
            if not owner:
                return kind  # tempfile.mkdtemp's name, from jmoe before owners were recorded
            pid, _, host = owner.partition("@")
            if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
                return kind
            return None
    return None


def _remove_stale(parent: str, base: str, out: str) -> None:
    """Remove the work folders of killed runs to ``out``; a previous output caught moved
    aside (killed mid-swap, ``out`` missing) goes back to ``out``."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        kind = _stale_kind(name, base)
        if kind is None:
            continue
        path = os.path.join(parent, name)
        kept = os.path.join(path, "x")
        if kind == "old" and os.path.lexists(kept) and not os.path.lexists(out):
            os.replace(kept, out)
            _log.warning("restored %s from %s, left by a killed run", out, path)
        shutil.rmtree(path, ignore_errors=True)


def _cannot_write(out: str, e: OSError) -> ValueError:
    at = f" ({e.filename})" if e.filename and os.fspath(e.filename) != out else ""
    return ValueError(f"cannot write output {out!r}: {e.strerror or e}{at}")


def _make_parents(parent: str, out: str) -> list[str]:
    """Create ``parent`` and its missing ancestors; return those created, deepest last."""
    missing = []
    p = parent
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"cannot write output {out!r}: {p!r} is a file, not a folder")
    created = []
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o777)
            created.append(d)
    except OSError as e:
        _remove_dirs(created)
        raise _cannot_write(out, e) from None
    return created


def _remove_dirs(created: list[str]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask races with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: str) -> None:
    """Modes as any new folder and file get (some writers, safetensors' among them, make
    their files 0600)."""
    mask = _umask()
    for here, _, files in os.walk(folder):
        os.chmod(here, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(here, f), 0o666 & ~mask)


def _check_sources(out: str, sources) -> None:
    real_out = os.path.realpath(out)
    for src in sources:
        real_src = os.path.realpath(src)
        rel = ("is" if real_out == real_src
               else "is inside" if os.path.commonpath([real_out, real_src]) == real_src
               else "contains" if os.path.commonpath([real_out, real_src]) == real_out else None)
        if rel:
            raise ValueError(f"output {out!r} {rel} the source {os.fspath(src)!r}: expected an "
                             "output folder outside the source (writing it would replace or "
                             "delete the source)")


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False, *, sources=()):
    """Yield a new empty folder beside ``out``; it becomes ``out`` only if the body succeeds.

    Before the body runs (so before any weight is read): ``out`` that is, contains or
    sits inside one of ``sources`` is a ValueError; an existing ``out`` without
    ``overwrite`` a FileExistsError; an ``out`` that cannot be created a ValueError
    naming it. The work folder is ``.OUT.partial-PID@HOST-RAND`` in ``out``'s parent
    folder; with ``overwrite`` the previous ``out`` waits in ``.OUT.old-PID@HOST-RAND``
    for the instant of the swap. Those a killed run left are removed by the next run
    to the same ``out`` on the same machine. The result's folders and files get the
    modes the umask gives new ones (not tempfile's 0700); parents created for ``out``
    are removed again if the body fails.
    """
    out = os.path.abspath(out)
    _check_sources(out, sources)
    parent, base = os.path.split(out)
    created = _make_parents(parent, out)
    tmp = None
    try:
        _remove_stale(parent, base, out)
        if os.path.lexists(out) and not overwrite:
            raise FileExistsError(f"output {out!r} already exists (pass --overwrite to replace it)")
        tmp = os.path.join(parent, _work_name(base, "partial"))
        try:
            os.mkdir(tmp, 0o700)  # private while written; _follow_umask opens it at the end
        except OSError as e:
            tmp = None
            raise _cannot_write(out, e) from None
        yield tmp
        _follow_umask(tmp)
        if os.path.lexists(out):
            old = os.path.join(parent, _work_name(base, "old"))
            os.mkdir(old, 0o700)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)):
            raise ValueError(f"output {out!r} not written: {e}") from None
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


# bytes of leaves gathered into one orbax partial save by ``save_checkpoint_streaming``:
# orbax holds about 2.3x a part while writing it (measured), so small parts bound memory
PART_BYTES = 64 << 20
# where orbax's partial save (``ocp.partial``) puts the tree inside ``params/``
PARTIAL_ITEM = "state"


def save_checkpoint_streaming(folder: str, config, leaves, part_bytes: int | None = None) -> None:
    """Write ``config.json`` and ``params/`` from ``(path, array)`` pairs, in parts.

    Leaves are gathered until they reach ``part_bytes`` (default ``PART_BYTES``; a larger
    leaf is a part of its own), then written with orbax's partial save
    (``orbax.checkpoint.experimental.v1.partial.save``) and dropped; ``finalize``
    merges the parts into one orbax checkpoint whose tree is ``params/state``
    (``jmoe.load`` reads both this and ``save_checkpoint``'s layout). Peak memory:
    one part plus the leaf being built, whatever the model size.
    """
    from orbax.checkpoint.experimental.v1 import partial

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    target = os.path.abspath(os.path.join(folder, "params"))
    part_bytes = PART_BYTES if part_bytes is None else part_bytes
    part, size = {}, 0
    for path, leaf in leaves:
        node = part
        for p in path[:-1]:
            node = node.setdefault(p, {})
        # a jax array over the same memory (CPU device_put of an aligned array does not
        # copy): orbax then makes one copy of it while writing instead of ~1.2
        node[path[-1]] = jax.device_put(leaf) if isinstance(leaf, np.ndarray) else leaf
        size += leaf.nbytes
        del leaf, node
        if size >= part_bytes:
            partial.save(target, part)
            part, size = {}, 0
            _return_freed_memory()
    if part:
        partial.save(target, part)
    del part
    partial.finalize(target)


def _return_freed_memory():
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): a streamed
    conversion frees a part's buffers after each write, and without this the freed
    memory stays resident and fragmented, so the peak creeps up with the number of
    parts written. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _params_dir(folder: str) -> str:
    """The orbax tree of a checkpoint: ``params/state`` (written in parts) or ``params``."""
    params_dir = os.path.abspath(os.path.join(folder, "params"))
    item = os.path.join(params_dir, PARTIAL_ITEM)
    return item if os.path.isfile(os.path.join(item, "_METADATA")) else params_dir


def _plain(tree):
    """An orbax metadata tree or a tree of ShapeDtypeStructs as nested dicts of
    ``(shape, dtype name)``."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tuple(tree.shape), str(np.dtype(tree.dtype))


def expected_params(config) -> dict:
    """The ``(shape, dtype)`` of every params leaf of ``config`` (nothing allocated)."""
    return _plain(abstract_params(config, as_struct=True))


def _first_difference(a, b, path=()):
    """The first leaf or subtree path where two nested dicts differ, with both values
    (None where one side lacks it; ``"{...}"`` for a subtree)."""
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, path + (k,))
            if found:
                return found
        elif x != y:
            show = lambda v: "{...}" if isinstance(v, dict) else v  # noqa: E731
            return "/".join(map(str, path + (k,))), show(x), show(y)
    return None


def _damaged(folder: str, e: Exception) -> ValueError:
    reason = " ".join(str(e).split()).split(" [tensorstore_spec=")[0]
    reason = reason if len(reason) <= 200 else reason[:200] + " ..."
    return ValueError(f"jmoe checkpoint {folder!r}: params/ is damaged or incomplete "
                      f"({type(e).__name__}: {reason}); re-save or re-convert it")


def _drops_closed_loop(previous):
    # a failed orbax restore leaves tensorstore reads in flight whose callbacks report
    # "Event loop is closed" into the loop orbax already closed, one traceback each; a
    # read coroutine collected unfinished reports its GeneratorExit wrapped by orbax
    def hook(unraisable):
        e = unraisable.exc_value
        closed = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        aborted = (isinstance(getattr(e, "__cause__", None), GeneratorExit)
                   and str(e).startswith("Encountered error while reading array index"))
        if not (closed or aborted):
            previous(unraisable)

    hook.jmoe_drops_closed_loop = True
    return hook


def stored_params(folder: str) -> dict:
    """The ``(shape, dtype)`` of every leaf a jmoe checkpoint's ``params/`` holds, from
    its orbax metadata (no weight is read)."""
    if not os.path.isdir(os.path.join(folder, "params")):
        raise FileNotFoundError(f"jmoe checkpoint {folder!r} has no params/ folder")
    try:
        meta = _orbax().StandardCheckpointer().metadata(_params_dir(folder))
        meta = getattr(meta, "item_metadata", meta)
        return _plain(getattr(meta, "tree", meta))  # orbax's tree metadata -> its dict
    except Exception as e:  # orbax / tensorstore errors of a damaged params/
        raise _damaged(folder, e) from None


def _restore_params(folder: str, config, mesh=None, target=None):
    target = abstract_params(config, as_struct=True) if target is None else target
    if mesh is not None:  # restore each leaf straight into its shards (no full host copy)
        shardings = sharding.param_shardings(param_logical_axes(config), mesh,
                                             num_experts=config.num_experts)
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                              target, shardings)
    previous = sys.unraisablehook
    if not getattr(previous, "jmoe_drops_closed_loop", False):
        sys.unraisablehook = _drops_closed_loop(previous)
    try:
        params = _restore_in_parts(_params_dir(folder), target)
    except Exception as e:
        # the filter stays: the aborted reads report moments after the error
        raise _damaged(folder, e) from None
    sys.unraisablehook = previous
    return params


class StoredParams:
    """A jmoe checkpoint's params read one leaf at a time: ``tree[a][b]...`` down to a
    leaf restores that leaf (as a host jax array in its stored dtype) and keeps only
    the last one read, so walking every leaf holds at most one besides what the caller
    keeps (``jmoe.convert.jmoe_to_hf``'s bounded export). Open with ``open_stored``."""

    def __init__(self, folder: str, structs, path=(), last=None):
        self._folder, self._structs, self._path = folder, structs, path
        self._last = [None, None] if last is None else last  # (path, array) shared

    def __getitem__(self, key):
        node, path = self._structs[key], self._path + (key,)
        if isinstance(node, Mapping):
            return StoredParams(self._folder, node, path, self._last)
        if self._last[0] != path:
            self._last[:] = [None, None]  # drop the previous leaf before reading
            target: dict = {}
            sub = target
            for k in path[:-1]:
                sub = sub.setdefault(k, {})
            sub[path[-1]] = node
            got = _restore_params(self._folder, None, target=target)
            for k in path:
                got = got[k]
            self._last[:] = [path, got]
        return self._last[1]


def open_stored(folder: str):
    """``(config, StoredParams)`` of a jmoe checkpoint, its config checked against its
    params' metadata (no weight is read); errors as ``load``."""
    folder = require_folder(folder, "jmoe checkpoint")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {folder!r}: expected a jmoe checkpoint")
    config, _, structs = _checked_config(folder, read_json(cfg_path), cfg_path)
    return config, StoredParams(folder, structs)


def _checked_config(folder: str, raw, cfg_path: str):
    """``(config, stored, structs)`` of a jmoe checkpoint's config.json ``raw``: the
    params' metadata and the config's abstract params, refused (one line) if they
    differ. No weight is read."""
    config = config_from_dict(raw, cfg_path)
    stored, structs = stored_params(folder), abstract_params(config, as_struct=True)
    found = _first_difference(_plain(structs), stored)
    if found:
        leaf, want, got = found
        raise ValueError(f"{cfg_path} does not match its params/: {leaf} is {got} in "
                         f"params/, config.json implies {want}")
    return config, stored, structs


def _restore_in_parts(params_dir: str, target, part_bytes: int | None = None):
    """Restore ``target`` (a tree of ShapeDtypeStructs, with or without shardings) as jax
    arrays, ``PART_BYTES`` of leaves per orbax restore (``partial_restore``).

    One whole-tree restore holds every leaf's read buffer at once besides the arrays
    (measured 1.5x the weights at peak); in parts the peak is the weights plus one part's
    buffers. Each leaf is restored straight into its ``dtype`` and sharding.
    """
    ocp = _orbax()
    part_bytes = PART_BYTES if part_bytes is None else part_bytes
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    ckptr = ocp.PyTreeCheckpointer()
    out: list = [None] * len(flat)

    def restore(group):
        item, args = {}, {}
        for i in group:
            path, s = flat[i]
            node, anode = item, args
            for p in path[:-1]:
                node, anode = node.setdefault(p.key, {}), anode.setdefault(p.key, {})
            node[path[-1].key] = s
            anode[path[-1].key] = ocp.ArrayRestoreArgs(
                dtype=s.dtype, global_shape=s.shape,
                sharding=getattr(s, "sharding", None) or device)
        got = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        for i in group:
            leaf = got
            for p in flat[i][0]:
                leaf = leaf[p.key]
            out[i] = leaf
        del got
        _return_freed_memory()  # the part's read buffers, else resident and fragmented

    group, size = [], 0
    for i, (_, s) in enumerate(flat):
        group.append(i)
        size += int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
        if size >= part_bytes:
            restore(group)
            group, size = [], 0
    if group:
        restore(group)
    return jax.tree_util.tree_unflatten(treedef, out)


def check_matches_weights(config, overrides: dict, stored: dict, source: str):
    """``config`` with ``overrides``, refused if they contradict the weights' shapes.

    ``stored`` is what the weights hold (``_plain`` form, shapes compared), made for
    ``config``. The ValueError names the first override that alone changes a shape,
    its value and the checkpoint's. Overrides that keep every shape (dtype, causal,
    rope_theta, routing, ...) are applied as asked.
    """
    if not overrides:
        return config
    new = config.replace(**overrides)
    want = _shapes(stored)
    if _shapes(expected_params(new)) == want:
        return new
    changed = [k for k in overrides if getattr(new, k) != getattr(config, k)]

    def shapes_change(fields) -> bool:
        try:
            return _shapes(expected_params(config.replace(**fields))) != want
        except ValueError:  # not a valid config on its own
            return False

    # the first field that changes a shape alone, or whose removal restores every shape
    culprit = next((k for k in changed if shapes_change({k: overrides[k]})), None) or next(
        (k for k in changed if not shapes_change({j: overrides[j] for j in changed if j != k})
         and _valid(config, {j: overrides[j] for j in changed if j != k})), None)
    if culprit is not None:
        raise ValueError(f"override {culprit}={overrides[culprit]!r} contradicts the weights of "
                         f"{source!r}, made for {culprit}={getattr(config, culprit)!r}: only "
                         "overrides that keep every weight's shape are allowed")
    given = ", ".join(f"{k}={overrides[k]!r}" for k in changed)
    theirs = ", ".join(f"{k}={getattr(config, k)!r}" for k in changed)
    raise ValueError(f"overrides {given} together contradict the weights of {source!r}, made "
                     f"for {theirs}: only overrides that keep every weight's shape are allowed")


def _valid(config, fields) -> bool:
    try:
        config.replace(**fields)
    except ValueError:
        return False
    return True


def _shapes(tree):
    return {k: _shapes(v) for k, v in tree.items()} if isinstance(tree, dict) else tree[0]


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
            its ``generation_config.json`` refining the generation defaults. Either is
            read without a second copy of the weights: a checkpoint is restored in
            64 MiB parts straight into its dtype, an HF folder leaf by leaf into jax
            arrays.
        tokenizer: bool, default True: load the folder's tokenizer (jmoe's character
            tokenizer, or ``transformers.AutoTokenizer`` when HF tokenizer files are
            there; None when there are none). False: ``Model.tokenizer`` is None.
        **config_overrides: config fields replaced for this load, e.g.
            ``dtype="float32" | "bfloat16"`` (params cast, float32 ``expert_bias``
            kept; default the checkpoint's, for an HF folder its weights' own: float32
            or bfloat16, float16 weights need ``dtype``), ``causal=False``,
            ``attention_block_length=N`` (block-causal attention; a bidirectional
            model then generates with the llada2 convention, blocks of N and the exact
            K/V cache), ``mask_token_id``, ``moe_backend``, ``routing="expert_choice"``
            with ``capacity_factor``, ``generation={...}``. ``mesh=jmoe.make_mesh(...)``
            restores the params straight into their shards (routed experts split over
            ``expert``, the rest replicated) and runs the MoE layers expert-parallel;
            ``ep_capacity_factor`` (None: dropless, or a float > 0) sets its buffer
            policy. An override must keep every weight's shape: ``num_layers=2`` on a
            4-layer checkpoint (or ``num_experts``, ``hidden_size``, ``qk_norm``,
            ``tie_word_embeddings``, ...) is refused before any weight is read.
            Overrides that keep the shapes but change the function (``rope_theta``,
            ``rotary_fraction``, ``causal``, ``num_experts_per_tok``, ...) are applied
            as asked.

    Returns:
        ``jmoe.Model(config, params, tokenizer)``: the frozen config with the
        overrides, the params pytree of jax arrays (placed on ``mesh`` if given) and
        the tokenizer or None.

    Raises:
        FileNotFoundError: ``path`` or its ``config.json`` does not exist (or the
            shipped model is missing); an HF folder with neither ``model.safetensors``
            nor ``model.safetensors.index.json``, or without a shard its index names.
        ValueError, each naming the file or field: ``path`` is a file; invalid JSON;
            a jmoe ``config.json`` with an unknown ``family`` or field, or not
            matching its ``params/``; a damaged ``params/`` (truncated files, ...);
            an HF ``config.json`` missing a required field, of a ``model_type`` jmoe
            does not read, or with a setting it does not implement (an activation
            other than SiLU, attention or linear biases, RoPE scaling, a token id
            outside the vocabulary, ...); a damaged or empty safetensors file; a
            missing, unexpected or mis-shaped HF tensor; float16 / mixed-dtype weights
            or a ``config.json`` dtype other than the weights' without ``dtype``; an
            unknown override field, a value the config rejects or one that contradicts
            the weights' shapes; ``num_experts`` not divisible by the mesh's
            ``expert`` axis.

    ``generation_config.json`` keys jmoe cannot honour are ignored with a logged
    warning naming them. Transformers' own errors surface unchanged for a damaged
    tokenizer (``tokenizer=False`` skips the tokenizer).

    Example:
        model = jmoe.load("ckpt/olmoe", dtype="float32")
    """
    if path is None:
        path = DEFAULT_MODEL_DIR
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"the shipped default model is missing from {path!r}")
    path = require_folder(path, "model folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a jmoe checkpoint or an "
                                "HF model folder")
    raw = read_json(cfg_path)
    mesh = config_overrides.get("mesh")
    if isinstance(raw, dict) and "family" in raw:
        config, stored, structs = _checked_config(path, raw, cfg_path)
        check_matches_weights(config, config_overrides, stored, path)  # before any read
        params = _restore_params(path, config, mesh, structs)
    else:
        ids = {k: config_overrides[k] for k in TOKEN_ID_FIELDS if k in config_overrides}
        config = config_from_hf_dir(path, **ids)
        # read_params checks every tensor against this config's shapes
        check_matches_weights(config, config_overrides, expected_params(config), path)
        # each leaf becomes a jax array (on a mesh: its shards) as soon as it is read: one
        # copy of the weights
        shardings = None
        if mesh is not None:
            shardings = sharding.param_shardings(param_logical_axes(config), mesh,
                                                 num_experts=config.num_experts)

        def place(leaf_path, leaf):
            return jax.device_put(leaf, None if shardings is None
                                  else get_path(shardings, leaf_path))

        params, dtype = read_params(path, config, config_overrides.get("dtype"), progress=False,
                                    place=place)
        config = config.replace(dtype=dtype)
    if config_overrides:
        new = config.replace(**config_overrides)
        if new.dtype != config.dtype:
            params = cast_params(params, new.dtype)
        config = new
    if config.mesh is not None:  # a no-op for leaves already placed
        params = sharding.shard_params(params, param_logical_axes(config), config.mesh,
                                       num_experts=config.num_experts)
    tok = _load_tokenizer(path) if tokenizer else None
    return Model(platform_lib.resolve(config, params), params, tok)
