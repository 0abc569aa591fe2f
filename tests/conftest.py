"""Shared fixtures: tiny random HF checkpoints made with ``save_pretrained``.

Nothing is loaded from a model hub: every HF model here is built from a config
with random weights (fixed torch seed) and saved into a temp folder.
"""

from __future__ import annotations

import os

# Tests run on CPU in float32; keep XLA from grabbing all cores' worth of threads twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# no persistent compilation cache in tests (test_scale_memory checks it in a subprocess)
os.environ["JMOE_COMPILATION_CACHE"] = "0"

import pytest


def own_stderr_lines(stderr: str) -> list[str]:
    """A subprocess's stderr without the start-up logging of XLA's plugins (the CUDA
    plugin of jmoe[aot] logs through absl at import on a machine without a GPU)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and "absl" not in ln and "cudart_stub" not in ln]


def make_hf_olmoe(folder, seed=0, **overrides):
    """Save a tiny random ``OlmoeForCausalLM`` into ``folder``; return the torch model."""
    import torch
    import transformers

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=8,
              num_experts_per_tok=2, eos_token_id=3, pad_token_id=1, bos_token_id=None)
    kw.update(overrides)
    cfg = transformers.OlmoeConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.OlmoeForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        # every weight random, norms too (HF initialises norms to ones and may zero the
        # router, which would hide a norm mix-up or make expert selection a tie)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model


@pytest.fixture
def hf_olmoe(tmp_path):
    def make(**overrides):
        folder = tmp_path / f"hf_{len(os.listdir(tmp_path))}"
        model = make_hf_olmoe(folder, **overrides)
        return folder, model

    return make
