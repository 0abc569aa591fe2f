"""The diffusion sampler: ``generate``, its output and adaptive expert budgets.

Glossary. Shape letters: B batch, P the batch's longest prompt, G generated
positions (``gen_length``), L = P + G, V vocab, S model calls. Diffusion terms:
*mask* the mask token on a position not yet generated; *block* ``block_length``
generated positions decoded before the next block starts; *step* one model
call; *commit* writing a sampled token for good; *remask* a masked position a
step leaves masked; *budget* a position's number of experts (``experts_per_token``).

Modules: ``schedules`` (blocks, the even schedule), ``remasking`` (sampling,
confidence, commit rules), ``budgets`` (``AdaptiveExperts`` and growth), ``state``
(static options and the loop carry), ``loop`` (``step`` and the compiled
``lax.while_loop``), ``generate`` (the host-side API).
"""

from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.generate import GenerateOutput, generate

__all__ = ["generate", "GenerateOutput", "AdaptiveExperts"]
