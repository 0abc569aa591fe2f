"""The diffusion sampler: ``generate``, its output and adaptive expert budgets.

Glossary. Shape letters: B batch, P the batch's longest prompt, G generated
positions (``gen_length``), L = P + G, V vocab, S model calls. Diffusion terms:
*mask* the mask token on a position not yet generated; *block* ``block_length``
generated positions decoded before the next block starts; *step* one model
call; *commit* writing a sampled token for good; *remask* a masked position a
step leaves masked; *budget* a position's number of experts (``experts_per_token``).

Modules: ``conventions`` (the LLaDA and LLaDA2 rules as strategy objects: layout,
lengths, commit and block-end rules, which rows a step computes), ``options`` (every
option resolved once: caller, model's generation defaults, library), ``schedules``
(blocks, the even schedule), ``remasking`` (sampling, confidence, commit rules),
``decoders`` (fixed, threshold, dInfer's credit and hierarchy, LLaDA2.1's joint
M2T + T2T decoding; top-k / top-p and the tempered confidence), ``entropy_bound``
(DiffusionGemma's uniform-noise canvas sampler: temperature schedule, entropy-bound
acceptance, renoising, stable-and-confident stop),
``budgets`` (``AdaptiveExperts`` and growth), ``state`` (static options and the loop
carry), ``model_call`` (the one door to the model and its K/V cache), ``loop``
(``step`` and the compiled ``lax.while_loop``), ``canvas`` (host-side canvas and
output), ``generate`` (the host-side API).
"""

from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.generate import GenerateOutput, generate

__all__ = ["generate", "GenerateOutput", "AdaptiveExperts"]
