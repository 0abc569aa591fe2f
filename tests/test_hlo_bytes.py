"""The HLO bytes model (``jmoe.hlo_bytes``) and the Pallas grid traffic model
(``pallas_kernels.moe_gmm.traffic``), each against bytes counted by hand or a brute-force
walk of the kernel's grid written here from its index maps."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import hlo_bytes as hb
from pallas_kernels.moe_gmm.traffic import gmm_bytes, tiles_of


def compiled_text(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def test_shapes_tuples_and_on_chip_buffers():
    got = hb.parse_shape("(bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}, f32[<=10,3]{1,0})")
    assert [(a.dtype, a.dims, a.on_chip) for a in got] == [
        ("bf16", (8, 128), True), ("s32", (), True), ("f32", (10, 3), False)]
    assert hb.hbm_bytes(got) == 10 * 3 * 4


def test_matmul_reads_operands_and_writes_result_once():
    x, w = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 256), jnp.float32)
    total, _ = hb.program_bytes(compiled_text(lambda x, w: x @ w, x, w))
    assert total == (64 * 128 + 128 * 256 + 64 * 256) * 4


def test_gather_counts_the_rows_it_reads_not_the_table():
    table, ids = jnp.ones((1000, 64), jnp.float32), jnp.arange(16, dtype=jnp.int32)
    total, rows = hb.program_bytes(compiled_text(lambda t, i: jnp.take(t, i, axis=0) * 2,
                                                 table, ids))
    # 16 rows read, 16 rows written, the ids read
    assert total == 16 * 64 * 4 * 2 + 16 * 4
    assert total < 1000 * 64 * 4


def test_loop_body_counts_its_trip_count():
    x = jnp.ones((256,), jnp.float32)

    def f(x):
        return jax.lax.fori_loop(0, 7, lambda i, a: jnp.sin(a) * 2.0, x)

    total, rows = hb.program_bytes(compiled_text(f, x))
    body = [r for r in rows if r.times == 7]
    assert body, rows
    # every op in the body is multiplied by 7: the body's sin/mul fusion moves 2 x 1 KiB
    assert sum(r.bytes for r in body) >= 7 * 2 * 256 * 4


def test_in_place_update_counts_the_update_only():
    cache, new = jnp.zeros((64, 1024), jnp.float32), jnp.ones((1, 1024), jnp.float32)

    def f(c, n, i):
        return jax.lax.dynamic_update_slice(c, n * 2, (i, 0))

    text = jax.jit(f, donate_argnums=0).lower(cache, new, jnp.int32(3)).compile().as_text()
    total, _ = hb.program_bytes(text)
    assert total < 64 * 1024 * 4  # never the whole cache
    assert total >= 2 * 1024 * 4  # the update read and written


def brute_force(counts, *, lowering, tm, tn, k, n, n_rhs, n_out, itemsize):
    """Walk ``kernel.gmm``'s grid (column tiles outer, row tiles inner) with its index
    maps and count block fetches: TPU fetches a block when its index changes from the
    previous grid step; Triton loads every block of every live program."""
    te_live = [e for e, c in enumerate(counts) for _ in range(-(-c // tm))]
    live = len(te_live)
    tiles = live + 3  # the static bound leaves dead tiles at the end
    te = te_live + [te_live[-1]] * (tiles - live)
    moved, last = 0, {}
    for j, i in itertools.product(range(n // tn), range(tiles)):
        if lowering == "tpu":
            row = min(i, live - 1)
            blocks = {"lhs": ((row, 0), tm * k), "rhs": ((te[i], j), n_rhs * k * tn),
                      "out": ((row, j), n_out * tm * tn)}
            for name, (index, size) in blocks.items():
                if last.get(name) != index:
                    moved += size
                    last[name] = index
        elif i < live:
            moved += tm * k + n_rhs * k * tn + n_out * tm * tn
    return moved * itemsize


@pytest.mark.parametrize("lowering", ["tpu", "gpu"])
@pytest.mark.parametrize("counts", [[3, 0, 70, 0, 0, 129], [1], [0, 0, 5], [300, 300]])
def test_kernel_traffic_equals_a_walk_of_its_grid(lowering, counts):
    kw = dict(lowering=lowering, tm=64, tn=128, k=256, n=512, n_rhs=2, n_out=1, itemsize=2)
    assert gmm_bytes(counts, **kw) == brute_force(counts, **kw)


def test_kernel_traffic_reads_only_touched_experts_weights_on_tpu():
    k, n = 256, 512
    one = gmm_bytes([10, 0, 0, 0], lowering="tpu", tm=128, tn=128, k=k, n=n, n_rhs=1,
                    n_out=1, itemsize=2)
    assert one == 2 * (128 * k + k * n + 128 * n)  # one tile: rows once, weights once
    assert list(tiles_of([3, 0, 300], 128)) == [0, 2, 2, 2]


def test_prefetch_into_vmem_counts_one_read_on_tpu():
    # a v5e program: XLA prefetches the weight into VMEM (copy-start to S(1)); the dot
    # then reads VMEM. The model: the weight read once, x read, the result written.
    from jmoe import aot

    dev = aot.target_devices("v5e-8")[0]
    one = jax.sharding.SingleDeviceSharding(dev)
    s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)  # noqa: E731
    text = jax.jit(lambda x, w: x @ w).lower(s((32, 2048)), s((2048, 2048))).compile().as_text()
    total, rows = hb.program_bytes(text)
    assert total == 2 * (2048 * 2048 + 32 * 2048 + 32 * 2048), rows
