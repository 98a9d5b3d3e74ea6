"""XLA's unoptimised backend, for tests whose time is compilation, not execution.

Level 0 roughly halves XLA's CPU compile time (cold: reproduce smoke 161 -> 73 s, multi-device
script 74 -> 49 s on 2 cores) and changes no result these tests check. The statistical tests keep
the default: they are run-time bound and take about twice as long at level 0.
"""

import functools

import jax

# For subprocesses (XLA_FLAGS must be set before jax is imported there).
XLA_FLAGS = "--xla_backend_optimization_level=0"

# For in-process programs: one jit at a time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
