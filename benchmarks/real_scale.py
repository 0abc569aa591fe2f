"""Real scale on one machine: published-size checkpoints converted, loaded and run.

Run: python benchmarks/real_scale.py --scratch /work/bigscratch \\
         [--models olmoe-1b-7b llada-moe-7b llada2-mini] [--disk-cap-gb 40]

For each model (``jmoe.config.PRESETS``), one at a time, in ``--scratch``:

1. ``make_full_size.write``: a random bf16 HF folder in the published layout.
2. conversion (``python -m checkpoints_convert``) in a child process: wall time and the
   child's peak resident memory (``VmHWM``), next to the bound 2 GiB + the largest
   tensor. The HF folder is deleted once converted.
3. OLMoE / LLaDA-MoE: ``jmoe.load`` of the converted folder and ``jmoe.generate`` of 32
   tokens (block 32, threshold 0.9) from a 64-token prompt, in a child process with a
   fresh persistent compilation cache (``JMOE_CACHE_DIR``), then again in a second
   child: load time and peak RSS (vs the bf16 weights), first call (compile + run),
   compile time first and cached (first call minus a second, compiled call), time per
   denoising step (second call / NFE) and tokens/s (32 / second call).
4. LLaDA2.0-mini: conversion, then ``jmoe plan --model HF_FOLDER --target v5e-8``. When
   the HF folder plus the output would pass ``--disk-cap-gb``, the conversion is
   stopped as the scratch folder reaches the cap, and what it did by then (tensors,
   bytes, rate, peak RSS) is reported.

Every model's folders are deleted before the next starts. A step waits (up to 10
minutes) for ``MemAvailable`` >= ``--min-free-gb`` before a full-size child starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import make_full_size  # noqa: E402

GIB = 1 << 30

CHILD_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, numpy as np
import jmoe
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) << 10
out = {"import_s": time.perf_counter() - t0, "cache_dir": jmoe.compile_cache.current()}
t = time.perf_counter()
model = jmoe.load(sys.argv[1], tokenizer=False, **json.loads(sys.argv[2]))
jax.block_until_ready(model.params)
out["load_s"] = time.perf_counter() - t
out["load_rss"] = hwm()
out["weights"] = sum(x.nbytes for x in jax.tree.leaves(model.params))
prompt = np.random.default_rng(0).integers(100, 1000, (1, 64)).tolist()
kw = dict(gen_length=32, block_length=32, threshold=0.9)
for name in ("first", "second"):
    t = time.perf_counter()
    r = jmoe.generate(model, prompt, **kw)
    jax.block_until_ready(r.tokens if hasattr(r, "tokens") else r.nfe)
    out[name + "_s"] = time.perf_counter() - t
    out["nfe"] = int(np.asarray(r.nfe).max())
out["peak_rss"] = hwm()
print("RESULT " + json.dumps(out))
"""

CHILD_CONVERT = r"""
import json, sys, time
from jmoe.convert import hf_to_jmoe
t = time.perf_counter()
hf_to_jmoe(sys.argv[1], sys.argv[2], overwrite=True, progress=True)
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) << 10
print("RESULT " + json.dumps({"convert_s": time.perf_counter() - t, "convert_rss": hwm}))
"""


# OLMoE is autoregressive and has no mask token: it is run as a diffusion model the way
# benchmarks/sampler.py runs it (bidirectional, an unused id of its padded vocabulary)
LOAD_OVERRIDES = {"olmoe-1b-7b": {"causal": False, "mask_token_id": 50303}}


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    e.update(extra)
    return e


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) << 10
    return 0


WAIT_MINUTES = 40


def wait_for_memory(gb: float):
    for _ in range(WAIT_MINUTES * 2):
        if mem_available() >= gb * GIB:
            return
        print(f"  waiting: {mem_available() / GIB:.1f} GiB available < {gb} GiB", flush=True)
        time.sleep(30)
    raise SystemExit(f"less than {gb} GiB available for {WAIT_MINUTES} minutes; try later")


def du(path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def child(code, args, extra_env=None, watch=None):
    """Run ``code`` in a child python; returns (result dict or None, stdout tail, rc).
    ``watch``: a function polled every 2 s; True kills the child (reported killed)."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], env=env(**(extra_env or {})),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines, killed = [], None
    import threading

    def read():
        for line in p.stdout:
            lines.append(line)

    th = threading.Thread(target=read, daemon=True)
    th.start()
    sampled = 0
    while p.poll() is None:
        try:  # the child's peak RSS, sampled here too (a killed child cannot report it)
            status = open(f"/proc/{p.pid}/status").read()
            sampled = max(sampled, int(status.split("VmHWM:")[1].split()[0]) << 10)
        except (OSError, IndexError):
            pass
        if watch is not None and (why := watch()):
            killed = why
            p.kill()
            break
        time.sleep(2)
    p.wait()
    th.join(5)
    result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
    if result is not None:
        result["sampled_rss"] = sampled
    return result, "".join(lines)[-3000:], p.returncode, (killed, sampled)


def largest_tensor(config) -> int:
    return max(make_full_size._nbytes(t) for t in make_full_size.hf_tensors(config))


def run_model(name, scratch, args, rows):
    from jmoe.config import PRESETS

    config = PRESETS[name]
    hf, ck = os.path.join(scratch, name + "-hf"), os.path.join(scratch, name + "-jmoe")
    row = {"model": name}
    if args.reuse and os.path.isfile(os.path.join(ck, "config.json")):
        # a converted folder left by an earlier run (stopped while waiting for memory):
        # its size, conversion time and peak RSS are that run's (--json of it)
        print(f"== {name}: reusing {ck}", flush=True)
        return run_generate(name, scratch, args, rows, row, ck)
    for p in (hf, ck):
        shutil.rmtree(p, ignore_errors=True)
    print(f"== {name}: writing the HF folder", flush=True)
    made = make_full_size.write(name, hf, progress=False)
    row.update(size=made["bytes"], make_s=made["seconds"], largest=largest_tensor(config))
    print(f"  {made['bytes'] / 1e9:.2f} GB in {made['seconds']:.0f} s", flush=True)

    cap = args.disk_cap_gb * 1e9
    watch = (lambda: du(scratch) > cap and f"scratch reached {du(scratch) / 1e9:.1f} GB") \
        if cap else None
    wait_for_memory(4)  # the conversion's memory is bounded (about 1 GiB measured)
    print(f"== {name}: converting", flush=True)
    t = time.perf_counter()
    res, tail, rc, (killed, sampled) = child(CHILD_CONVERT, [hf, ck], watch=watch)
    row["convert_wall"] = time.perf_counter() - t
    if res:
        row.update(res)
    elif killed:
        # the child's last progress line says how far it got; its peak RSS was sampled
        # from /proc every 2 s while it ran
        row.update(convert_killed=killed, convert_rss=sampled,
                   convert_progress=tail.replace("\r", "\n").strip().splitlines()[-1])
        for leftover in os.listdir(scratch):  # the killed run's hidden work folder
            if leftover.startswith(f".{name}-jmoe.partial-"):
                shutil.rmtree(os.path.join(scratch, leftover), ignore_errors=True)
    else:
        print(tail)
        raise SystemExit(f"conversion of {name} failed (rc {rc})")
    print(f"  {json.dumps({k: v for k, v in row.items() if k.startswith('convert')})}", flush=True)

    if name == "llada2-mini":
        print(f"== {name}: jmoe plan --target v5e-8", flush=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jmoe.cli", "plan", "--model", hf,
                            "--target", "v5e-8"], env=env(), capture_output=True, text=True,
                           cwd=ROOT)
        row["plan_s"] = time.perf_counter() - t
        row["plan_rc"] = p.returncode
        row["plan_out"] = (p.stdout + p.stderr)[-2500:]
        print(row["plan_out"], flush=True)
    shutil.rmtree(hf, ignore_errors=True)

    if name != "llada2-mini" and res:
        return run_generate(name, scratch, args, rows, row, ck)
    shutil.rmtree(ck, ignore_errors=True)
    rows.append(row)
    return row


def run_generate(name, scratch, args, rows, row, ck):
    """Two load + generate children sharing a fresh compilation cache; then ``ck`` goes."""
    cache = os.path.join(scratch, "jax_cache-" + name)
    shutil.rmtree(cache, ignore_errors=True)
    for run in ("run1", "run2"):
        wait_for_memory(args.min_free_gb)
        print(f"== {name}: load + generate ({run}, cache {cache})", flush=True)
        r, tail, rc, _ = child(CHILD_RUN, [ck, json.dumps(LOAD_OVERRIDES.get(name, {}))],
                               {"JMOE_CACHE_DIR": cache})
        if r is None:
            print(tail)
            raise SystemExit(f"{run} of {name} failed (rc {rc})")
        print(f"  {json.dumps(r)}", flush=True)
        row[run] = r
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(ck, ignore_errors=True)
    rows.append(row)
    return row


def table(rows):
    g = lambda b: "-" if b is None else f"{b / 1e9:.1f} GB"  # noqa: E731
    out = ["| model | size | largest tensor | convert | convert peak RSS (bound) | load | "
           "load peak RSS (x weights) | 1st call: compile+run, fresh / cached | compile "
           "fresh / cached | step | tokens/s | peak RSS |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        conv = (f"{r['convert_s']:.0f} s ({r['size'] / r['convert_s'] / 1e6:.0f} MB/s)"
                if "convert_s" in r else f"stopped: {r.get('convert_killed')}")
        rss = (f"{r['convert_rss'] / GIB:.2f} GiB (<= {(2 * GIB + r['largest']) / GIB:.2f})"
               if "convert_rss" in r else "-")
        cells = [r["model"], g(r.get("size")), f"{r.get('largest', 0) / 1e6:.0f} MB", conv, rss]
        if "run1" in r:
            a, b = r["run1"], r["run2"]
            step = a["second_s"] / a["nfe"]
            cells += [f"{a['load_s']:.0f} s",
                      f"{a['load_rss'] / GIB:.1f} GiB ({a['load_rss'] / a['weights']:.2f}x)",
                      f"{a['first_s']:.0f} s / {b['first_s']:.0f} s",
                      f"{a['first_s'] - a['second_s']:.0f} s / {b['first_s'] - b['second_s']:.0f} s",
                      f"{step:.2f} s ({a['nfe']} steps)", f"{32 / a['second_s']:.2f}",
                      f"{max(a['peak_rss'], b['peak_rss']) / GIB:.1f} GiB"]
        else:
            cells += ["-"] * 7
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch", required=True, help="folder for the full-size checkpoints")
    p.add_argument("--models", nargs="+", default=["olmoe-1b-7b", "llada-moe-7b", "llada2-mini"])
    p.add_argument("--disk-cap-gb", type=float, default=40.0,
                   help="stop a conversion when --scratch holds more (0: no cap)")
    p.add_argument("--min-free-gb", type=float, default=18.0,
                   help="MemAvailable a full-size load waits for (up to 40 minutes)")
    p.add_argument("--reuse", action="store_true",
                   help="load a converted folder an earlier run left instead of remaking it")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    rows = []
    for name in args.models:
        run_model(name, args.scratch, args, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
