"""HF <-> jmoe conversion lives in ``jmoe.convert`` (reading HF folders: ``jmoe.hf``); this
package keeps ``python -m checkpoints_convert`` and its import paths working."""

from jmoe.convert import (MAX_SHARD_BYTES, SIDE_FILES, copy_side_files, hf_to_jmoe,
                          iter_hf_tensors, jmoe_to_hf)
from jmoe.hf import SafetensorsReader, read_params

__all__ = ["MAX_SHARD_BYTES", "SIDE_FILES", "SafetensorsReader", "copy_side_files",
           "hf_to_jmoe", "iter_hf_tensors", "jmoe_to_hf", "read_params"]
