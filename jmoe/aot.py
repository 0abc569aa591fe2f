"""``jmoe.aot.plan``: compile a model's programs for a TPU or GPU target on any machine,
and size them before anyone rents a chip.

Shape letters: B batch, P prompt length, G generated positions, L = P + G, S block.
A target names a slice (``"v5e-8"``, ``"h100-8"``); its devices come from
``jax.experimental.topologies`` (libtpu for TPU targets, the CUDA plugin for GPU ones,
with ``JAX_PLATFORMS=cpu`` set before jax is imported so no device is needed), the
params and inputs are ``ShapeDtypeStruct``s placed on a ``(data, expert)`` mesh over
them, and each program is lowered and compiled as jmoe would run it there (the kernel
table of the target platform, ``jmoe.platform``). Nothing is allocated or run.

Per program and device, a ``ProgramPlan`` holds XLA's ``memory_analysis`` (arguments,
temporaries, outputs), whether it fits with ``HEADROOM``, XLA's cost model (flops,
bytes accessed; a custom call counts none; on GPU the CPU client's HLO cost analysis
of the optimized module, since the GPU plugin's own returns None), jmoe's all-to-all
bytes and ``roofline_s = max(bytes / bandwidth, flops / peak)``. These are cost-model
figures, not measured times, and the cost model's bytes are not HBM traffic (for a
lone bf16 matmul on v5e it reports 2-5x the operand bytes): compare them only with
another program compiled and costed the same way.

Example:
    p = jmoe.aot.plan("llada2-mini", target="v5e-8", expert=8, batch=32)
    print(p.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.routing import check_expert_set

HEADROOM = 0.9  # a program fits when it needs at most this share of a device's HBM
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One target slice. Chip figures are the vendors' published specs (bf16 dense
    peak, HBM capacity and bandwidth per chip); a device is what JAX calls one (a
    v4 chip shows as two devices here, so each gets half)."""

    platform: str        # "tpu" | "gpu"
    topology: str        # jax.experimental.topologies name (TPU) or "1x1xN" (GPU)
    chips: int
    hbm_per_chip: float  # bytes
    hbm_bw_per_chip: float  # bytes/s
    peak_per_chip: float    # bf16 FLOP/s, dense
    gpu_config: str | None = None  # GpuTargetConfigProto file in jmoe/targets/


# TPU: cloud.google.com/tpu/docs system architecture pages (v4, v5e, v5p, v6e);
# GPU: NVIDIA H100 SXM5 and H200 SXM datasheets (bf16 dense, without sparsity).
HARDWARE = {
    "v4-8": Hardware("tpu", "v4:2x2x1", 4, 32 * GiB, 1.2e12, 275e12),
    "v5e-4": Hardware("tpu", "v5e:2x2", 4, 16 * GiB, 819e9, 197e12),
    "v5e-8": Hardware("tpu", "v5e:2x4", 8, 16 * GiB, 819e9, 197e12),
    "v5p-8": Hardware("tpu", "v5p:2x2x1", 4, 95 * GiB, 2.765e12, 459e12),
    "v6e-8": Hardware("tpu", "v6e:2x4", 8, 32 * GiB, 1.64e12, 918e12),
    "h100-1": Hardware("gpu", "1x1x1", 1, 80e9, 3.35e12, 989e12, "h100.txtpb"),
    "h100-8": Hardware("gpu", "1x1x8", 8, 80e9, 3.35e12, 989e12, "h100.txtpb"),
    "h200-1": Hardware("gpu", "1x1x1", 1, 141e9, 4.8e12, 989e12, "h200.txtpb"),
    "h200-8": Hardware("gpu", "1x1x8", 8, 141e9, 4.8e12, 989e12, "h200.txtpb"),
}
PROGRAMS = ("forward", "step", "generate")


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One compiled program's per-device figures (bytes, FLOPs, seconds)."""

    param_bytes: int
    temp_bytes: int
    output_bytes: int
    hbm_bytes: int           # arguments + temporaries + outputs - aliased
    fits: bool               # hbm_bytes <= HEADROOM * the device's HBM
    flops: float             # XLA's cost model
    bytes_accessed: float    # XLA's cost model (not HBM traffic)
    all_to_all_bytes: int    # jmoe's expert-parallel exchange, per model call
    roofline_s: float        # max(bytes_accessed / bandwidth, flops / peak), cost model
    custom_calls: tuple[str, ...]  # custom-call targets in the optimized program
    # the compiler's message when it refused the program for memory (then fits is False,
    # temp_bytes what it reported needing, the cost-model figures NaN); None: compiled
    compile_error: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``plan`` returns: the target, the mesh and one ``ProgramPlan`` per program."""

    model: str
    target: str
    data: int
    expert: int
    batch: int
    prompt_length: int
    gen_length: int
    block_length: int
    moe_backend: str
    device_hbm_bytes: float
    programs: dict[str, ProgramPlan]
    experts_per_block: int | None = None  # block expert sets (None: off) and their rule
    expert_set: str | None = None

    def to_dict(self) -> dict:
        """The plan as plain values (NaN cost figures of a refused program as None, so
        ``json.dumps`` writes strict JSON)."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return None if isinstance(v, float) and math.isnan(v) else v
        return clean(dataclasses.asdict(self))

    def table(self) -> str:
        """A plain-text table, one row per program (GiB per device, milliseconds)."""
        head = (f"{self.model} on {self.target} (data={self.data}, expert={self.expert}), "
                f"batch {self.batch}, prompt {self.prompt_length}, gen {self.gen_length}, "
                f"block {self.block_length}, moe_backend {self.moe_backend}"
                + (f", block expert sets M={self.experts_per_block} ({self.expert_set})"
                   if self.experts_per_block is not None else "") + "; per device, "
                f"HBM {self.device_hbm_bytes / GiB:.1f} GiB; XLA cost-model figures")
        cols = ("program", "params GiB", "temp GiB", "out GiB", "HBM GiB", "fits", "GFLOP",
                "GB accessed", "a2a MB", "roofline ms")
        rows = [cols]
        notes = []
        for name, p in self.programs.items():
            if p.compile_error is not None:
                notes.append(f"{name}: the {self.target} compiler refused it: {p.compile_error}")
            rows.append((name, f"{p.param_bytes / GiB:.2f}", f"{p.temp_bytes / GiB:.2f}",
                         f"{p.output_bytes / GiB:.2f}", f"{p.hbm_bytes / GiB:.2f}",
                         "yes" if p.fits else "NO", f"{p.flops / 1e9:.1f}",
                         f"{p.bytes_accessed / 1e9:.2f}", f"{p.all_to_all_bytes / 1e6:.1f}",
                         f"{p.roofline_s * 1e3:.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join([head] + lines + notes)


# -- inputs: the config, the devices, the mesh -----------------------------------------------

def config_of(config_or_path):
    """A config from a preset name, a config, or a checkpoint folder (config.json only)."""
    from jmoe import config as config_lib

    if isinstance(config_or_path, config_lib.MoEConfig):
        return config_or_path, type(config_or_path).__name__
    name = os.fspath(config_or_path)
    presets = config_lib.PRESETS
    if name in presets:
        return presets[name], name
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {name!r}: expected a jmoe checkpoint or "
                                    "an HF model folder")
        with open(path) as f:
            raw = json.load(f)
        if isinstance(raw, dict) and "family" in raw:
            from jmoe.checkpoint import config_from_dict

            return config_from_dict(raw), name
        from jmoe.hf import config_from_hf_dir

        return config_from_hf_dir(name), name
    raise ValueError(f"model {name!r}: expected a preset name ({', '.join(sorted(presets))}), "
                     "a jmoe config, or a checkpoint folder")


def target_devices(target: str):
    """The devices of a target slice, compiled for without the hardware."""
    if target not in HARDWARE:
        raise ValueError(f"target={target!r}: expected one of {', '.join(HARDWARE)}")
    hw = HARDWARE[target]
    from jax.experimental import topologies

    # deviceless compilation touches no chip: let several processes load libtpu at once
    # (else a second one fails on libtpu's lock file)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if hw.platform == "tpu":
            topo = topologies.get_topology_desc(platform="tpu", topology_name=hw.topology)
        else:
            text = open(os.path.join(os.path.dirname(__file__), "targets", hw.gpu_config)).read()
            topo = topologies.get_topology_desc(platform="cuda", topology=hw.topology,
                                                target_config=text)
    except Exception as err:  # noqa: BLE001 - a missing plugin surfaces as many error types
        import importlib.util

        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        plugin = "libtpu" if hw.platform == "tpu" else "jax_cuda12_plugin"
        if importlib.util.find_spec(plugin) is None:
            need = ('libtpu: pip install "jax[tpu]=={v}" (or jmoe[aot])' if hw.platform == "tpu"
                    else 'the CUDA plugin: pip install "jax[cuda12-local]=={v}" '
                         "nvidia-cuda-nvcc-cu12 (or jmoe[aot])")
            raise ValueError(f"target {target!r} needs {need.format(v=jax.__version__)}; "
                             f"compiling for it failed: {first}") from None
        hint = ("; set JAX_PLATFORMS=cpu before jax is imported" if hw.platform == "gpu" else "")
        raise ValueError(f"compiling for target {target!r} failed: {first}{hint}") from None
    return list(topo.devices)


def target_mesh(devices, data: int, expert: int | None, num_experts: int):
    """A ``(data, expert)`` mesh over the target's devices (None for one device)."""
    from jmoe.sharding import DATA_AXIS, EXPERT_AXIS, check_experts_divisible

    n = len(devices)
    if not (isinstance(data, int) and data >= 1 and n % data == 0):
        raise ValueError(f"data={data!r}: expected a positive divisor of the target's {n} devices")
    expert = n // data if expert is None else expert
    if not (isinstance(expert, int) and expert >= 1 and data * expert == n):
        raise ValueError(f"data={data} x expert={expert!r}: expected data * expert == the "
                         f"target's {n} devices")
    check_experts_divisible(num_experts, _Sizes({EXPERT_AXIS: expert}))
    if n == 1:
        return None, 1
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.sharding.Mesh(np.array(devices).reshape(data, expert), (DATA_AXIS, EXPERT_AXIS),
                             axis_types=auto)
    return mesh, expert


class _Sizes:
    """A mesh stand-in carrying only axis sizes (for the divisibility check)."""

    def __init__(self, shape):
        self.shape = shape


# -- abstract inputs --------------------------------------------------------------------------

def _placed(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_params(config, mesh, device):
    """The params as ``ShapeDtypeStruct``s placed by their logical axes."""
    from jmoe.model import abstract_params as shapes, param_logical_axes
    from jmoe.sharding import param_shardings

    structs = shapes(config, as_struct=True)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(device)
        return jax.tree.map(lambda s: _placed(s.shape, s.dtype, one), structs)
    shardings = param_shardings(param_logical_axes(config), mesh, num_experts=config.num_experts)
    return jax.tree.map(lambda s, sh: _placed(s.shape, s.dtype, sh), structs, shardings)


def _replicated(mesh, device):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(device)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _batch_sharding(mesh, device, b: int, ndim: int):
    from jmoe.sharding import batch_spec

    if mesh is None:
        return jax.sharding.SingleDeviceSharding(device)
    spec = batch_spec(mesh, b)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(tuple(spec) + (None,) * (
        ndim - len(tuple(spec))))))


def per_device_bytes(structs) -> int:
    """Bytes one device holds of placed ``ShapeDtypeStruct``s."""
    total = 0
    for s in jax.tree.leaves(structs):
        shard = s.sharding.shard_shape(s.shape)
        total += math.prod(shard) * jnp.dtype(s.dtype).itemsize
    return int(total)


# -- the programs -----------------------------------------------------------------------------

def _call_budget(config, sets):
    """The model call's ``Budget``: the model's top-k, within block expert sets when
    ``sets = (M, rule)`` is given."""
    from jmoe.routing import Budget

    m, rule = sets or (None, "mass")
    return Budget(None, config.num_experts_per_tok, experts_per_block=m, expert_set_rule=rule)


def _lower_forward(config, params, mesh, device, batch: int, length: int, sets=None):
    from jmoe.model import _forward

    tok = _placed((batch, length), jnp.int32, _batch_sharding(mesh, device, batch, 2))
    valid = _placed((batch, length), jnp.bool_, _batch_sharding(mesh, device, batch, 2))
    return _forward.lower(params, tok, valid, _call_budget(config, sets), config=config,
                          capture=False)


def _sampler_setup(config, batch, prompt_length, gen_length, block_length, sets=None):
    """The options, the canvas and whether a cached block step applies."""
    from jmoe.sampling.budgets import AdaptiveExperts
    from jmoe.sampling.options import resolve_options

    # only shapes matter here: a model without a mask token (causal OLMoE) is planned
    # with a stand-in id
    mask_id = 0 if config.mask_token_id is None else None
    adaptive = None
    if sets:
        # block expert sets alone: every position keeps the model's top-k
        k = config.num_experts_per_tok
        adaptive = AdaptiveExperts(initial=k, maximum=k, experts_per_block=sets[0],
                                   expert_set=sets[1])
    if config.family == "diffusion_gemma":
        # its own convention: the canvas (``canvas_length``) is its block, the
        # entropy-bound decoder its rule, the model's generation defaults its options
        opts, knobs = resolve_options(config, gen_length=gen_length, adaptive=adaptive)
    else:
        opts, knobs = resolve_options(config, gen_length=gen_length, block_length=block_length,
                                      threshold=0.9, mask_id=mask_id, adaptive=adaptive)
    rows = [[0] * prompt_length for _ in range(batch)]
    canvas = opts.convention.layout(rows, opts, config)
    return opts, knobs, canvas


def _lower_step(config, params, mesh, device, batch, prompt_length, gen_length, block_length,
                sets=None):
    """One denoising step's model call: a cached block call where the convention caches
    (block-causal models), else the whole canvas."""
    from jmoe.kv_cache import KVCache
    from jmoe.model import apply
    from jmoe import xla_options

    opts, _, canvas = _sampler_setup(config, batch, prompt_length, gen_length, block_length,
                                     sets)
    if not opts.cached:
        return _lower_forward(canvas.config, params, mesh, device, batch,
                              canvas.tokens_BL.shape[1], sets), canvas.tokens_BL.shape[1]
    cfg, length = canvas.config, canvas.tokens_BL.shape[1]
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, batch, length))
    shard4 = _batch_sharding(mesh, device, batch, 4)
    cache = cache.replace(
        k=tuple(_placed(a.shape, a.dtype, shard4) for a in cache.k),
        v=tuple(_placed(a.shape, a.dtype, shard4) for a in cache.v),
        length=_placed((), jnp.int32, _replicated(mesh, device)))
    budget = _call_budget(cfg, sets)
    step = xla_options.jit(lambda p, t, v, c, *, config: apply(config, p, t, valid_BL=v,
                                                               budgets=budget, cache=c),
                           static_argnames=("config",))
    tok = _placed((batch, block_length), jnp.int32, _batch_sharding(mesh, device, batch, 2))
    valid = _placed((batch, block_length), jnp.bool_, _batch_sharding(mesh, device, batch, 2))
    return step.lower(params, tok, valid, cache, config=cfg), block_length


def _lower_denoise(config, params, mesh, device, batch, prompt_length, gen_length):
    """DiffusionGemma's denoising step: the decoder over one canvas (``canvas_length``
    tokens) reading an encoder cache of prompt + generation positions."""
    from jmoe import xla_options
    from jmoe.sampling.model_call import denoise_call, new_encoder_cache

    c = config.canvas_length
    cache = jax.eval_shape(lambda: new_encoder_cache(config, batch, prompt_length + gen_length))
    shard4 = _batch_sharding(mesh, device, batch, 4)
    cache = cache.replace(
        k=tuple(_placed(a.shape, a.dtype, shard4) for a in cache.k),
        v=tuple(_placed(a.shape, a.dtype, shard4) for a in cache.v),
        length=_placed((), jnp.int32, _replicated(mesh, device)),
        key_valid=_placed(cache.key_valid.shape, jnp.bool_,
                          _batch_sharding(mesh, device, batch, 2)))
    step = xla_options.jit(
        lambda p, t, cache, off, sc, *, config: denoise_call(
            p, t, None, config=config, opts=None, cache=cache, offset=off,
            self_cond_BCV=sc)[:2], static_argnames=("config",))
    tok = _placed((batch, c), jnp.int32, _batch_sharding(mesh, device, batch, 2))
    sc = _placed((batch, c, config.vocab_size), jnp.float32,
                 _batch_sharding(mesh, device, batch, 3))
    off = _placed((), jnp.int32, _replicated(mesh, device))
    return step.lower(params, tok, cache, off, sc, config=config), c


def _lower_generate(config, params, mesh, device, batch, prompt_length, gen_length,
                    block_length, sets=None):
    from jmoe.sampling import loop

    opts, knobs, canvas = _sampler_setup(config, batch, prompt_length, gen_length, block_length,
                                         sets)
    shape = canvas.tokens_BL.shape
    sh = _batch_sharding(mesh, device, batch, 2)
    rep = _replicated(mesh, device)
    key = jax.eval_shape(lambda: jax.random.key(0))
    knobs = {k: _placed((), jnp.float32, rep) for k in knobs}
    lowered = loop.run.lower(params, _placed(shape, jnp.int32, sh), _placed(shape, jnp.bool_, sh),
                             _placed(shape, jnp.bool_, sh), _placed(key.shape, key.dtype, rep),
                             knobs, config=canvas.config, opts=canvas.opts)
    return lowered, canvas.opts.block_length if canvas.opts.cached else shape[1]


# -- analysis ---------------------------------------------------------------------------------

def cost(compiled, platform: str) -> tuple[float, float]:
    """``(flops, bytes_accessed)`` of a compiled program by XLA's cost model (GPU: the CPU
    client's HLO cost analysis of the optimized module; custom calls count nothing)."""
    if platform == "gpu":
        from jax._src.lib import _jax

        cpu = jax.devices("cpu")[0].client
        out = {"flops": 0.0, "bytes accessed": 0.0}
        for module in compiled.runtime_executable().hlo_modules():
            got = _jax.hlo_module_cost_analysis(cpu, module)
            out = {k: out[k] + max(float(got.get(k, 0.0)), 0.0) for k in out}
    else:
        out = compiled.cost_analysis()
        out = out[0] if isinstance(out, (list, tuple)) else out
    return float(out.get("flops", 0.0)), float(out.get("bytes accessed", 0.0))


def custom_calls(compiled) -> tuple[str, ...]:
    """The custom-call targets of the optimized program, sorted."""
    return tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory(error: Exception, *, param_bytes: int, a2a: int) -> ProgramPlan | None:
    """The plan of a program the target's compiler refused for memory (XLA's
    ``RESOURCE_EXHAUSTED``: the TPU compiler checks a program's temporaries against the
    chip's HBM), or None for any other error. ``temp_bytes`` is the need it reported
    (0 if the message gives none); the cost-model figures are NaN."""
    msg = str(error)
    if "RESOURCE_EXHAUSTED" not in msg:
        return None
    line = msg[msg.index("RESOURCE_EXHAUSTED"):].splitlines()[0]
    got = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", line)
    temp = int(float(got.group(1)) * _UNITS[got.group(2)]) if got else 0
    nan = float("nan")
    return ProgramPlan(param_bytes=param_bytes, temp_bytes=temp, output_bytes=0,
                       hbm_bytes=param_bytes + temp, fits=False, flops=nan,
                       bytes_accessed=nan, all_to_all_bytes=a2a, roofline_s=nan,
                       custom_calls=(), compile_error=line)


@contextlib.contextmanager
def without_persistent_cache():
    """JAX's persistent compilation cache off for the block (and as it was after).

    A target's programs compile against a device topology with no client: the cache
    can write them but never load them back (JAX warns "PjRtCompiler must be
    constructed with a Client" on each later plan), so ``plan`` compiles them with it
    off rather than fill ``jmoe.compile_cache``'s directory with entries nothing reads.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    was = jax.config.jax_enable_compilation_cache
    cc.reset_cache()  # JAX decides once per process whether the cache is used
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        cc.reset_cache()


def analyse(compiled, *, hw: Hardware, devices: int, param_bytes: int, a2a: int) -> ProgramPlan:
    per_device = hw.chips / devices
    mem = compiled.memory_analysis()
    hbm = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes)
    flops, accessed = cost(compiled, hw.platform)
    roofline = max(accessed / (hw.hbm_bw_per_chip * per_device),
                   flops / (hw.peak_per_chip * per_device))
    return ProgramPlan(param_bytes=param_bytes, temp_bytes=int(mem.temp_size_in_bytes),
                       output_bytes=int(mem.output_size_in_bytes), hbm_bytes=int(hbm),
                       fits=hbm <= HEADROOM * hw.hbm_per_chip * per_device, flops=flops,
                       bytes_accessed=accessed, all_to_all_bytes=a2a, roofline_s=roofline,
                       custom_calls=custom_calls(compiled))


@dataclasses.dataclass
class Targeted:
    """A model's programs lowered for a target (what ``plan`` compiles and sizes)."""

    name: str
    config: Any              # the config as placed: mesh, platform and backend set
    hardware: Hardware
    devices: list
    mesh: Any
    expert: int
    param_bytes: int         # per device
    lowered: dict            # program -> (jax Lowered, tokens per model call)


def targeted(config_or_path, *, target: str, data: int = 1, expert: int | None = None,
             batch: int = 1, prompt_length: int = 256, gen_length: int = 256,
             block_length: int = 32, moe_backend: str = "auto",
             programs=("forward", "step", "generate"), experts_per_block: int | None = None,
             expert_set: str = "mass") -> Targeted:
    """Lower ``programs`` for ``target`` (arguments and errors as ``plan``); call
    ``.compile()`` on each to inspect the program itself, e.g. its HLO
    (``jmoe.hlo_bytes``), inside ``with without_persistent_cache():`` (JAX's persistent
    cache cannot load a target's programs back)."""
    config, name = config_of(config_or_path)
    bad = [p for p in programs if p not in PROGRAMS]
    if bad or not programs:
        raise ValueError(f"programs={tuple(programs)!r}: expected some of {PROGRAMS}")
    for label, v in (("batch", batch), ("prompt_length", prompt_length),
                     ("gen_length", gen_length), ("block_length", block_length)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"{label}={v!r}: expected a positive int")
    hw = HARDWARE.get(target)
    devices = target_devices(target)
    m = check_expert_set(config, experts_per_block, expert_set)
    sets = None if m is None else (m, expert_set)
    mesh, expert = target_mesh(devices, data, expert, config.num_experts)
    config = config.replace(mesh=mesh, platform=hw.platform, moe_backend=moe_backend)
    params = abstract_params(config, mesh, devices[0])
    lowerers = {
        "forward": lambda: (_lower_forward(config, params, mesh, devices[0], batch,
                                           prompt_length + gen_length, sets),
                            prompt_length + gen_length),
        "step": lambda: _lower_step(config, params, mesh, devices[0], batch, prompt_length,
                                    gen_length, block_length, sets),
        "generate": lambda: _lower_generate(config, params, mesh, devices[0], batch,
                                            prompt_length, gen_length, block_length, sets),
    }
    if config.family == "diffusion_gemma":
        # its step is the canvas decoder over the encoder's cache
        lowerers["step"] = lambda: _lower_denoise(config, params, mesh, devices[0], batch,
                                                  prompt_length, gen_length)
    return Targeted(name=name, config=config, hardware=hw, devices=devices, mesh=mesh,
                    expert=expert, param_bytes=per_device_bytes(params),
                    lowered={p: lowerers[p]() for p in programs})


def plan(config_or_path, *, target: str, data: int = 1, expert: int | None = None,
         batch: int = 1, prompt_length: int = 256, gen_length: int = 256,
         block_length: int = 32, moe_backend: str = "auto",
         programs=("forward", "step", "generate"), experts_per_block: int | None = None,
         expert_set: str = "mass") -> Plan:
    """Compile ``programs`` of a model for ``target`` without the hardware, and size them.

    Args:
        config_or_path: a preset name (``jmoe.config.PRESETS``: ``"olmoe-1b-7b"``,
            ``"llada-moe-7b"``, ``"llada2-mini"``, ``"diffusiongemma-26b-a4b"``), a config,
            or a checkpoint folder (jmoe or HF) whose config.json is read; no weights are
            loaded.
        target: one of ``HARDWARE`` (``"v4-8"``, ``"v5e-4"``, ``"v5e-8"``, ``"v5p-8"``,
            ``"v6e-8"``, ``"h100-1"``, ``"h100-8"``, ``"h200-1"``, ``"h200-8"``).
        data, expert: the mesh; ``data * expert`` must be the target's device count
            (``expert`` defaults to devices // data) and ``num_experts`` divisible by
            ``expert``.
        batch, prompt_length, gen_length, block_length: the generation's shapes (tokens).
            DiffusionGemma denoises canvases of its ``canvas_length`` (its block; the
            ``step`` program is the canvas decoder over the encoder's K/V cache, the
            ``generate`` program its entropy-bound sampler loop), so ``block_length`` is
            not used there.
        moe_backend: the expert backend (``"auto"``: the target platform's, see
            ``jmoe.platform``).
        programs: any of ``"forward"`` (one call over prompt + generation), ``"step"``
            (one denoising step: a cached block call for block-causal models, else the
            whole canvas) and ``"generate"`` (the whole compiled sampler loop; XLA's cost
            model counts its loop body once).
        experts_per_block, expert_set: block expert sets (``jmoe.AdaptiveExperts``): None
            (default, off) or M in ``top-k..E``, each model call routes to at most M
            distinct experts per MoE layer and sequence; ``expert_set`` the set rule
            (``"mass"``, ``"first_step"``, ``"topk_mass"``; it changes only the
            ``generate`` program). Every position keeps the model's top-k.

    Returns:
        ``Plan``: per program and device ``param_bytes``, ``temp_bytes``, ``output_bytes``,
        ``hbm_bytes``, ``fits`` (with ``HEADROOM``), the cost model's ``flops`` and
        ``bytes_accessed``, ``all_to_all_bytes`` (per model call) and ``roofline_s``.
        A program the target's compiler refuses for memory (the TPU compiler checks
        temporaries against HBM) is planned as not fitting: ``fits`` False,
        ``temp_bytes`` the need the compiler reported, ``compile_error`` its message, the
        cost-model figures NaN (the table prints the message under the rows).

    Raises:
        ValueError: an unknown target, model or program; a mesh that does not match the
            target's devices; experts not divisible by ``expert``; ``experts_per_block``
            outside ``top-k..E``, an unknown ``expert_set``, or block sets with expert-choice
            routing; libtpu or the CUDA
            plugin missing (one line naming what to install).
        FileNotFoundError: a folder without config.json.

    Example:
        p = jmoe.aot.plan("llada2-mini", target="v5e-8", expert=8, batch=32)
        print(p.table(), p.programs["step"].fits)
    """
    from jmoe.expert_parallel import all_to_all_bytes

    t = targeted(config_or_path, target=target, data=data, expert=expert, batch=batch,
                 prompt_length=prompt_length, gen_length=gen_length,
                 block_length=block_length, moe_backend=moe_backend, programs=programs,
                 experts_per_block=experts_per_block, expert_set=expert_set)
    config, mesh, expert = t.config, t.mesh, t.expert
    out = {}
    for program, (lowered, call_length) in t.lowered.items():
        a2a = 0
        if mesh is not None and expert > 1:
            a2a = len(config.moe_layers) * all_to_all_bytes(config, batch, call_length, mesh)
        try:
            with without_persistent_cache():
                compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            # too big for the chip: that is the answer a plan gives, not a crash
            out[program] = out_of_memory(e, param_bytes=t.param_bytes, a2a=a2a)
            if out[program] is None:
                raise
            continue
        out[program] = analyse(compiled, hw=t.hardware, devices=len(t.devices),
                               param_bytes=t.param_bytes, a2a=a2a)
    name, hw, devices = t.name, t.hardware, t.devices
    if config.family == "diffusion_gemma":
        block_length = config.canvas_length  # its block: the canvas it denoises
    return Plan(model=name, target=target, data=data, expert=expert, batch=batch,
                prompt_length=prompt_length, gen_length=gen_length, block_length=block_length,
                moe_backend=moe_backend, device_hbm_bytes=hw.hbm_per_chip * hw.chips / len(devices),
                programs=out, experts_per_block=experts_per_block,
                expert_set=expert_set if experts_per_block is not None else None)


# -- the command line: ``jmoe plan`` ----------------------------------------------------------

def add_arguments(p):
    """``jmoe plan``'s options (every default printed in ``--help``)."""
    p.add_argument("--model", required=True,
                   help="a preset (olmoe-1b-7b, llada-moe-7b, llada2-mini, "
                        "diffusiongemma-26b-a4b) or a checkpoint folder, jmoe or HF (only "
                        "config.json is read)")
    p.add_argument("--target", required=True, help=f"one of: {', '.join(HARDWARE)}")
    p.add_argument("--data", type=int, default=1, help="data-parallel size (default: 1)")
    p.add_argument("--expert", type=int, default=None,
                   help="expert-parallel size (default: the target's devices / data)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default: 1)")
    p.add_argument("--prompt-length", type=int, default=256, help="tokens (default: 256)")
    p.add_argument("--gen-length", type=int, default=256, help="tokens (default: 256)")
    p.add_argument("--block-length", type=int, default=32, help="tokens (default: 32)")
    p.add_argument("--moe-backend", default="auto",
                   help="auto, pallas, ragged, bucketed, dense (default: auto, the target's)")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help=f"comma-separated, some of {','.join(PROGRAMS)} (default: all)")
    p.add_argument("--experts-per-block", type=int, default=None, metavar="M",
                   help="block expert sets: at most M distinct experts per MoE layer and "
                        "sequence in each model call, top-k <= M <= E (default: off)")
    p.add_argument("--expert-set", default="mass", choices=("mass", "first_step", "topk_mass"),
                   help="the block expert-set rule (default: mass)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args) -> int:
    """Plan from parsed arguments; print a table (or JSON). Errors are ValueErrors."""
    if "JAX_PLATFORMS" not in os.environ:
        # a plan needs no device, and compiling for a GPU slice without one needs the CPU
        # platform (else jax initialises the CUDA plugin and fails); no backend is up yet
        jax.config.update("jax_platforms", "cpu")
    p = plan(args.model, target=args.target, data=args.data, expert=args.expert,
             batch=args.batch, prompt_length=args.prompt_length, gen_length=args.gen_length,
             block_length=args.block_length, moe_backend=args.moe_backend,
             programs=tuple(s for s in args.programs.split(",") if s),
             experts_per_block=args.experts_per_block, expert_set=args.expert_set)
    print(json.dumps(p.to_dict(), indent=1) if args.json else p.table())
    return 0
