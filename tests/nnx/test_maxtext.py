"""MaxText's Llama 2 decoder (an NNX ``Transformer``), scanned and unscanned, under lora_jax.

Runs in its own environment (``make test-slow`` builds ``.venv-maxtext``:
MaxText 0.2.5 needs JAX >= 0.11 and brings packages the main environments do
not carry). A tiny random-weight Llama 2 config is built through MaxText's own
``pyconfig`` and ``model_creation_utils``; then, on the NNX state
(``nnx.split``), which holds RNG keys and counters beside the weights:

* ``infer_layouts`` finds every projection, with MaxText's scan axis at
  position 1 (``param_scan_axis=1``: ``(d, layers, heads, head_dim)`` is
  ``"isoo"``) when ``scan_layers=True``;
* strict ``implicit`` (no fallback) equals the merged model;
* one optax step trains the factors, after which ``implicit`` still equals
  ``merge``, and the merged state runs in the module (``nnx.update``);
* the RNG key and counter leaves come back from ``merge`` as the same objects.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

try:
    from flax import nnx
except ImportError:  # the oldest Flax has no nnx; these tests never run there
    nnx = None

pytestmark = [pytest.mark.slow, pytest.mark.maxtext]


TARGETS = r".*/(query|key|value|out|wi_0|wi_1|wo)/kernel"
SEQ, VOCAB = 8, 64


def build(scan_layers: bool, out_dir: str):
    # imported here, so that where MaxText is absent the tests are deselected, not skipped
    maxtext = pytest.importorskip("maxtext")
    from maxtext.configs import pyconfig
    from maxtext.utils import maxtext_utils, model_creation_utils

    base_yml = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    cfg = pyconfig.initialize(
        [None, base_yml],
        run_name="lora_jax_test",
        base_output_directory=out_dir,
        enable_checkpointing=False,
        model_name="default",
        decoder_block="llama2",
        base_num_decoder_layers=2,
        base_emb_dim=32,
        base_num_query_heads=2,
        base_num_kv_heads=2,
        base_mlp_dim=64,
        head_dim=16,
        vocab_size=VOCAB,
        max_target_length=SEQ,
        max_prefill_predict_length=4,
        per_device_batch_size=1,
        attention="dot_product",
        scan_layers=scan_layers,
        dtype="float32",
        weight_dtype="float32",
        skip_jax_distributed_system=True,
        enable_dropout=False,
    )
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    model = model_creation_utils.create_model(cfg, mesh, rngs=nnx.Rngs(0))
    return model, mesh


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unscanned"])
def setup(request, tmp_path_factory):
    model, mesh = build(request.param, str(tmp_path_factory.mktemp("maxtext_output")))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, SEQ)), jnp.int32)
    positions = jnp.arange(SEQ, dtype=jnp.int32)[None]

    def fn(state, tokens):
        return nnx.merge(graphdef, state)(tokens, positions, enable_dropout=False)

    with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh:
        layouts = lj.infer_layouts(fn, state, tokens)
        base, delta = lj.init_lora(
            jax.random.key(0),
            state,
            lj.LoraConfig(targets=TARGETS, rank=2, alpha=4.0),
            layouts=layouts,
        )
        # both factors nonzero, so the adapter moves every output
        rng = np.random.default_rng(1)
        delta = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), delta)
        yield dict(
            scan=request.param,
            graphdef=graphdef,
            state=state,
            fn=fn,
            tokens=tokens,
            layouts=layouts,
            base=base,
            delta=delta,
            model=model,
        )


def test_layouts_follow_maxtext_scan_axis(setup):
    layouts = {p: l.axes for p, l in setup["layouts"].items() if "logits" not in p}
    if setup["scan"]:  # param_scan_axis=1: the layer axis second
        assert layouts["decoder/layers/self_attention/query/kernel"] == "isoo"
        assert layouts["decoder/layers/self_attention/out/kernel"] == "isio"
        assert layouts["decoder/layers/mlp/wi_0/kernel"] == "iso"
    else:
        assert layouts["decoder/layers_0/self_attention/query/kernel"] == "ioo"
        assert layouts["decoder/layers_1/mlp/wo/kernel"] == "io"
    n_kernels = 7 * (1 if setup["scan"] else 2)
    targeted = [
        p
        for p, f in lj.advanced.leaves_with_paths(setup["delta"], is_leaf=lj.advanced.is_factors)[0]
        if lj.advanced.is_factors(f)
    ]
    assert len(targeted) == n_kernels


def test_strict_implicit_trains_and_equals_merge(setup):
    fn, base, delta, tokens = setup["fn"], setup["base"], setup["delta"], setup["tokens"]
    implicit = jax.jit(lj.implicit(fn, strict=True))
    dense = jax.jit(fn)
    plain = dense(setup["state"], tokens)
    got = implicit(base, delta, tokens)
    np.testing.assert_allclose(got, dense(lj.merge(base, delta), tokens), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got - plain).max()) > 1e-3  # the adapter does something

    opt = optax.adam(1e-2)

    def loss(d, tokens):
        logits = lj.implicit(fn, strict=True)(base, d, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    @jax.jit
    def step(d, opt_state, tokens):
        value, grads = jax.value_and_grad(loss)(d, tokens)
        updates, opt_state = opt.update(grads, opt_state, d)
        return optax.apply_updates(d, updates), opt_state, value, grads

    trained, _, l0, grads = step(delta, opt.init(delta), tokens)
    factors = [
        f
        for f in jax.tree.leaves(grads, is_leaf=lj.advanced.is_factors)
        if lj.advanced.is_factors(f)
    ]
    assert factors and all(
        float(jnp.abs(f.a).max()) > 0 and float(jnp.abs(f.b).max()) > 0 for f in factors
    )
    assert float(loss(trained, tokens)) < float(l0)

    merged = lj.merge(base, trained)
    after = implicit(base, trained, tokens)
    np.testing.assert_allclose(after, dense(merged, tokens), rtol=1e-4, atol=1e-4)
    # the merged state runs in the module itself
    nnx.update(setup["model"], merged)
    module_out = setup["model"](
        tokens, jnp.arange(SEQ, dtype=jnp.int32)[None], enable_dropout=False
    )
    np.testing.assert_allclose(module_out, after, rtol=1e-4, atol=1e-4)


def test_rng_keys_and_counters_pass_through(setup):
    base, delta = setup["base"], setup["delta"]
    rows = lj.advanced.leaves_with_paths(base)[0]
    rng_rows = [(p, x) for p, x in rows if "/rngs/" in p]
    assert any(jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for _, x in rng_rows)
    assert any(x.dtype == jnp.uint32 for _, x in rng_rows)
    merged = dict(lj.advanced.leaves_with_paths(lj.merge(base, delta))[0])
    for path, x in rng_rows:
        assert merged[path] is x, path
