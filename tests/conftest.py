"""Test session setup: eight simulated CPU devices for the sharding tests.

``jax_num_cpu_devices`` must be set before JAX creates its CPU backend, so it is
set here, when pytest imports this file and before any test module runs JAX.
Tests that do not build a mesh still run on ``jax.devices()[0]`` as before.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
