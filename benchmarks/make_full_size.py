"""Write random checkpoints at the published sizes, in the published HF layouts.

    python benchmarks/make_full_size.py --model olmoe-1b-7b --out /work/bigscratch/olmoe-hf

Models (``jmoe.config.PRESETS``): ``olmoe-1b-7b`` (allenai/OLMoE-1B-7B-0924, 13.8 GB),
``llada-moe-7b`` (inclusionAI/LLaDA-MoE-7B-A1B-Instruct, 14.7 GB), ``llada2-mini``
(inclusionAI/LLaDA2.0-mini, 32.5 GB). Each folder gets:

- ``config.json`` with the preset's published values (``jmoe.hf_keys.hf_config_from``
  plus ``architectures`` and ``torch_dtype``), ``generation_config.json``;
- the real tensor names (``jmoe.hf_keys.rules_for``; LLaDA2's fused
  ``query_key_value``), bf16, LLaDA2's ``expert_bias`` float32;
- sharded safetensors (``model-0000i-of-0000n.safetensors``, at most ``--shard-gb``
  decimal GB each like the hub's 5 GB shards) and ``model.safetensors.index.json``;
- a ``tokenizer.json`` of the model's vocabulary size (a word-level tokenizer built
  locally with ``tokenizers``; the EOS / mask / pad ids at their published positions).

The weights are written tensor by tensor (each shard's safetensors header first, then
each tensor's bytes as a view of one 128 MiB pool of N(0, 0.02) values at a tensor-
dependent offset): peak memory is the pool, never a shard. Nothing here is committed;
write into a scratch folder and delete it when done.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmoe.config import PRESETS  # noqa: E402
from jmoe.hf_keys import hf_config_from, rules_for  # noqa: E402
from jmoe.model import abstract_params  # noqa: E402

ARCHITECTURES = {"olmoe-1b-7b": "OlmoeForCausalLM", "llada-moe-7b": "LLaDAMoEModelLM",
                 "llada2-mini": "LLaDA2MoeModelLM"}
POOL = 1 << 26  # values in the random pool (128 MiB of bf16)


def hf_tensors(config):
    """[(hf_key, shape in HF layout, safetensors dtype)] in key-table order."""
    shapes = abstract_params(config)
    out, fused = [], {}
    for rule in rules_for(config):
        shape = tuple(_get(shapes, rule.path))
        if rule.per_expert:
            shape = shape[1:]
        hf_shape = tuple(reversed(shape)) if rule.transpose else shape
        dt = "F32" if rule.float32 else "BF16"
        for key in rule.hf_keys(config.num_experts):
            if rule.rows is not None:  # fused rows: one HF tensor, rows summed
                if key not in fused:
                    fused[key] = len(out)
                    out.append([key, [0, hf_shape[1]], dt])
                out[fused[key]][1][0] += rule.rows[1] - rule.rows[0]
            else:
                out.append([key, list(hf_shape), dt])
    return [(k, tuple(s), d) for k, s, d in out]


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def plan_shards(tensors, shard_bytes):
    shards, cur, size = [], [], 0
    for t in tensors:
        n = _nbytes(t)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _nbytes(t):
    return int(np.prod(t[1])) * (4 if t[2] == "F32" else 2)


def tokenizer_files(folder, config):
    """A word-level ``tokenizer.json`` of ``config.vocab_size`` entries, special ids in place."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {config.eos_token_id: "<|endoftext|>", config.pad_token_id: "<|pad|>"}
    if getattr(config, "mask_token_id", None) is not None:
        specials[config.mask_token_id] = "<|mdm_mask|>"
    specials.setdefault(0, "<unk>")
    vocab = {specials.get(i, f"w{i}"): i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(sorted(set(specials.values())))
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": specials[config.eos_token_id],
           "pad_token": specials[config.pad_token_id], "unk_token": specials[0]}
    if getattr(config, "mask_token_id", None) is not None:
        cfg["mask_token"] = specials[config.mask_token_id]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def write(model: str, out: str, shard_gb: float = 5.0, progress: bool = True) -> dict:
    """Write the random full-size HF folder of preset ``model`` into ``out`` (created;
    must not exist). Returns {"bytes", "tensors", "shards", "seconds"}."""
    if model not in PRESETS:
        raise ValueError(f"model={model!r}: expected one of {sorted(PRESETS)}")
    return write_config(PRESETS[model], out, shard_gb, progress, ARCHITECTURES[model])


def write_config(config, out: str, shard_gb: float = 5.0, progress: bool = True,
                 architecture: str | None = None) -> dict:
    """``write`` for any jmoe ``config`` (bf16 weights): the mid-size checkpoints of the
    memory tests use it."""
    from tqdm.auto import tqdm

    os.makedirs(out)
    t0 = time.perf_counter()
    hf = hf_config_from(config.replace(dtype="bfloat16"))
    hf.update(torch_dtype="bfloat16", transformers_version="4.46.0")
    if architecture:
        hf["architectures"] = [architecture]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
           "transformers_version": "4.46.0"}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    tokenizer_files(out, config)

    import ml_dtypes

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(POOL, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    pool = np.concatenate([pool, pool])  # any window of <= POOL values is one slice
    pool32 = pool[:POOL].astype(np.float32)[: 1 << 20]

    tensors = hf_tensors(config)
    shards = plan_shards(tensors, int(shard_gb * 1e9))
    total = sum(map(_nbytes, tensors))
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
               disable=not progress)
    done = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dt in shard:
            n = _nbytes((key, shape, dt))
            header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out, name), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key, shape, dt in shard:
                n = int(np.prod(shape))
                if "norm" in key:  # RMSNorm scales near 1, as trained models have
                    data = np.ones(n, ml_dtypes.bfloat16)
                    f.write(data.tobytes())
                elif dt == "F32":
                    f.write(pool32[:n].tobytes())
                else:  # views of the pool, at most POOL values per write
                    start = zlib.crc32(key.encode()) % POOL
                    for a in range(0, n, POOL):
                        m = min(POOL, n - a)
                        f.write(pool[start:start + m].view(np.uint16).data)
                done += 1
                bar.set_postfix_str(f"{done}/{len(tensors)} tensors", refresh=False)
                bar.update(_nbytes((key, shape, dt)))
    bar.close()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {"bytes": total, "tensors": len(tensors), "shards": len(shards),
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--shard-gb", type=float, default=5.0,
                   help="largest shard in decimal GB (default 5, the hub's)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    r = write(a.model, a.out, a.shard_gb, not a.quiet)
    print(f"wrote {a.out}: {r['bytes'] / 1e9:.2f} GB, {r['tensors']} tensors in {r['shards']} "
          f"shards, {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
