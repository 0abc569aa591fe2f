"""Command line of the converter, shared by ``python -m checkpoints_convert`` and ``jmoe convert``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--hf-dir", help="HF model folder (config.json + safetensors) to convert")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="param dtype of the jmoe checkpoint (default: the source's)")
    p.add_argument("--to-hf", metavar="JMOE_DIR",
                   help="export the jmoe checkpoint JMOE_DIR back to the HF layout at --out")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from checkpoints_convert.convert import hf_to_jmoe, jmoe_to_hf

    progress = not args.quiet
    if args.to_hf:
        if args.hf_dir:
            raise ValueError("pass either --hf-dir (HF -> jmoe) or --to-hf (jmoe -> HF), not both")
        jmoe_to_hf(args.to_hf, args.out, overwrite=args.overwrite, progress=progress)
    else:
        if not args.hf_dir:
            raise ValueError("--hf-dir is required (or --to-hf JMOE_DIR to export)")
        hf_to_jmoe(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                   progress=progress)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description="Convert HF OLMoE / LLaDA-MoE checkpoints to jmoe (orbax) and back."))
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
