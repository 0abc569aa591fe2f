"""Pallas kernels for jmoe, one folder per op.

Each op folder holds ``reference.py`` (plain jnp, the semantics), the Pallas
kernel bodies with their jit wrappers (``interpret=`` for CPU), block sizes in a
frozen dataclass, and ``api.py`` that picks a lowering for the platform.
"""
