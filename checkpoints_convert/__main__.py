"""``python -m checkpoints_convert --hf-dir DIR --out OUT [--dtype bfloat16] [--to-hf]``."""

from checkpoints_convert.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
