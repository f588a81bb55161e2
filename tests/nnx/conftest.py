"""The ``tunix`` marker: tests that need google-tunix (and qwix, which it brings).

They run where tunix is installed (pinned google-tunix==0.1.7, which installs beside
jax 0.10.2 / flax 0.12.8 on Python 3.11 and beside jax 0.12.0.1 / flax 0.12.12 on
Python 3.12); ``-m 'not tunix'`` leaves them out elsewhere. They import tunix inside
the test, so a missing tunix is a skip, which the newest environment counts as a failure.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tunix: needs google-tunix (and qwix); run where it is installed"
    )


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

QWEN3_VOCAB = 64


@pytest.fixture
def tiny_qwen3():
    """``make()``: a tiny random tunix Qwen3 (2 layers, einsum attention with 3-D kernels,
    nnx.Linear MLPs), its zero-initialised MLP kernels filled with N(0, 0.2^2)."""
    qwen3 = pytest.importorskip("tunix.models.qwen3.model")

    def make():
        config = qwen3.ModelConfig(
            num_layers=2,
            vocab_size=QWEN3_VOCAB,
            embed_dim=32,
            hidden_dim=48,
            num_heads=4,
            head_dim=8,
            num_kv_heads=2,
            rope_theta=10_000,
            norm_eps=1e-6,
            use_tied_embedding=False,
        )
        model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(1)
        state = jax.tree_util.tree_map(
            lambda x: (
                jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
                if x.ndim >= 2 and not np.any(np.asarray(x))
                else x
            ),
            state,
        )
        return nnx.merge(graphdef, state)

    return make
