"""Names every docstring example in lora_jax may use without importing them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax)
    doctest_namespace.update({name: getattr(lora_jax, name) for name in lora_jax.__all__})
