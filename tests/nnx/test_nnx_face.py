"""lora_jax.nnx: an NNX module whose LoRA factors are nnx.LoRAParam Variables.

Every numeric check compares against an independent reference: the dense
kernels ``W + (alpha / r) A B`` formed here with NumPy (not lj.merge), the
gradients of lj.implicit on the delta, and an optax step taken by hand.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import nnx as lora_nnx

RANK, ALPHA = 3, 6.0


class Block(nnx.Module):
    """An embedding, a 2-D Linear in an nnx-visible list, a 3-D LinearGeneral, a BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.heads = nnx.LinearGeneral(8, (2, 4), rngs=rngs)  # kernel (8, 2, 4): "ioo"
        self.out = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)  # (2, 4, 8): "iio"
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)  # (batch, len, 8)
        h = h + self.out(jnp.tanh(self.heads(h)))
        return self.fc(self.norm(h).mean(axis=1))  # (batch, 5)


TARGETS = r"(embed/embedding|heads/kernel|out/kernel|fc/kernel)"
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 6)), jnp.int32)
LABELS = jnp.asarray([0, 3, 1, 4])


def _model(randomize) -> Block:
    model = Block(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, randomize(state, seed=1))
    model.norm.var[...] = jnp.abs(model.norm.var[...]) + 0.5  # a variance is positive
    return model


def _random_factors(delta, seed=2):
    """Both factors of every entry nonzero (a freshly drawn delta is the identity)."""
    rng = np.random.default_rng(seed)
    fill = lambda x: jnp.asarray(0.3 * rng.standard_normal(np.shape(x)), jnp.float32)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda f: f.replace(a=fill(f.a), b=fill(f.b)) if isinstance(f, lj.LoraFactors) else f,
        delta,
        is_leaf=lambda x: isinstance(x, lj.LoraFactors),
    )


def _lora_model(randomize, **config) -> lora_nnx.LoraModel:
    cfg = lj.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA, **config)
    lm = lora_nnx.lora(_model(randomize), cfg, jax.random.key(0), TOKENS)
    graphdef, base, delta = lora_nnx.split(lm)
    return lora_nnx.from_delta(nnx.merge(graphdef, base), _random_factors(delta))


def _dense_by_hand(lm: lora_nnx.LoraModel) -> dict[str, np.ndarray]:
    """``W + (alpha / r) A B`` of each adapted kernel, formed with NumPy from the Variables."""
    m = lm.model
    s = ALPHA / RANK
    val = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    emb = val(m.embed.embedding) + s * val(m.embed.embedding_lora_a) @ val(m.embed.embedding_lora_b)
    heads = val(m.heads.kernel) + s * np.einsum(
        "ir,rho->iho", val(m.heads.kernel_lora_a), val(m.heads.kernel_lora_b)
    )
    out = val(m.out.kernel) + s * np.einsum(
        "hkr,ro->hko", val(m.out.kernel_lora_a), val(m.out.kernel_lora_b)
    )
    fc = val(m.fc.kernel) + s * val(m.fc.kernel_lora_a) @ val(m.fc.kernel_lora_b)
    return {"embed": emb, "heads": heads, "out": out, "fc": fc}


def _dense_model(lm: lora_nnx.LoraModel) -> Block:
    """The plain module with the hand-formed dense kernels."""
    graphdef, base, _ = lora_nnx.split(lm)
    plain = nnx.merge(graphdef, base)
    dense = _dense_by_hand(lm)
    plain.embed.embedding[...] = jnp.asarray(dense["embed"], jnp.float32)
    for name in ("heads", "out", "fc"):
        getattr(plain, name).kernel[...] = jnp.asarray(dense[name], jnp.float32)
    return plain


def _loss(model, tokens, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()


def _param_arrays(module) -> dict[str, np.ndarray]:
    state = nnx.state(module, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {p: np.asarray(x) for p, x in lj.advanced.leaves_with_paths(state)[0]}


def _opt_update(optimizer, model, grads):
    """``Optimizer.update`` takes the model from flax 0.11 on."""
    if "model" in inspect.signature(optimizer.update).parameters:
        optimizer.update(model, grads)
    else:
        optimizer.update(grads)


def test_factors_are_lora_params_named_like_qwix(randomize):
    lm = _lora_model(randomize)
    paths = [p for p, _ in lj.advanced.leaves_with_paths(nnx.state(lm, nnx.LoRAParam))[0]]
    assert paths == sorted(
        f"model/{m}/{k}_lora_{x}"
        for m, k in [
            ("embed", "embedding"),
            ("heads", "kernel"),
            ("out", "kernel"),
            ("fc", "kernel"),
        ]
        for x in "ab"
    )
    assert lm.model.heads.kernel_lora_a[...].shape == (8, RANK)
    assert lm.model.heads.kernel_lora_b[...].shape == (RANK, 2, 4)
    assert lm.model.out.kernel_lora_a[...].shape == (2, 4, RANK)


def test_forward_equals_dense_kernels_formed_by_hand(randomize):
    lm = _lora_model(randomize)
    plain = _dense_model(lm)
    lm.eval(), plain.eval()
    out = lm(TOKENS)
    assert np.isfinite(out).all() and float(jnp.abs(out).max()) > 0.1
    np.testing.assert_allclose(out, plain(TOKENS), rtol=1e-5, atol=1e-5)
    # and under nnx.jit, in training mode (batch statistics written back)
    lm.train(), plain.train()
    out = nnx.jit(lambda m, x: m(x))(lm, TOKENS)
    np.testing.assert_allclose(out, plain(TOKENS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lm.model.norm.mean[...], plain.norm.mean[...], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(lm.model.norm.mean[...]).max()) > 1e-3  # the update did happen


def test_strict_forward_never_forms_the_dense_kernel(randomize):
    lm = _lora_model(randomize)
    assert lm.strict
    lm.eval()
    graphdef, base, delta = lora_nnx.split(lm)
    forward = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x), strict=True)
    np.testing.assert_allclose(lm(TOKENS), forward(base, delta, TOKENS), rtol=1e-6, atol=1e-6)


def test_lora_param_gradients_equal_implicit_delta_gradients(randomize):
    lm = _lora_model(randomize)
    lm.eval()
    _, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
        lm, TOKENS, LABELS
    )
    graphdef, base, delta = lora_nnx.split(lm)
    forward = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x))

    def delta_loss(d):
        logits = forward(base, d, TOKENS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

    expected = jax.grad(delta_loss)(delta)
    got = dict(lj.advanced.leaves_with_paths(grads)[0])
    want = {
        p: f
        for p, f in lj.advanced.leaves_with_paths(expected, is_leaf=lj.advanced.is_factors)[0]
        if isinstance(f, lj.LoraFactors)
    }
    assert len(want) == 4 and len(got) == 8
    for path, f in want.items():
        for x, ref in (("a", f.a), ("b", f.b)):
            g = got[f"model/{path}_lora_{x}"]
            assert float(jnp.abs(ref).max()) > 1e-4, (path, x)
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7, err_msg=f"{path} {x}")


def test_optimizer_step_changes_only_lora_params_and_equals_optax_on_the_delta(randomize):
    lm = _lora_model(randomize)
    lm.eval()
    model_before = _param_arrays(lm)
    graphdef, base, delta = lora_nnx.split(lm)
    tx = optax.adam(1e-2)
    optimizer = nnx.Optimizer(lm, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model, TOKENS, LABELS
        )
        _opt_update(optimizer, model, grads)
        return loss

    step(lm, optimizer)
    after = _param_arrays(lm)
    assert after.keys() == model_before.keys()
    for path in after:
        np.testing.assert_array_equal(after[path], model_before[path], err_msg=path)

    forward = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x))
    grads = jax.grad(
        lambda d: optax.softmax_cross_entropy_with_integer_labels(
            forward(base, d, TOKENS), LABELS
        ).mean()
    )(delta)
    updates, _ = tx.update(grads, tx.init(delta), delta)
    expected = optax.apply_updates(delta, updates)
    _, _, got = lora_nnx.split(lm)
    for (path, e), (_, g) in zip(
        lj.advanced.leaves_with_paths(expected, is_leaf=lj.advanced.is_factors)[0],
        lj.advanced.leaves_with_paths(got, is_leaf=lj.advanced.is_factors)[0],
    ):
        if isinstance(e, lj.LoraFactors):
            np.testing.assert_allclose(g.a, e.a, rtol=1e-5, atol=1e-6, err_msg=path)
            np.testing.assert_allclose(g.b, e.b, rtol=1e-5, atol=1e-6, err_msg=path)
    moved = [
        p
        for (p, g), (_, d) in zip(
            lj.advanced.leaves_with_paths(got)[0], lj.advanced.leaves_with_paths(delta)[0]
        )
        if not np.allclose(g, d)
    ]
    assert len(moved) == 8, moved  # every factor took the step


def _assert_same_delta(d1, d2):
    rows1 = lj.advanced.leaves_with_paths(d1, is_leaf=lj.advanced.is_delta_leaf)[0]
    rows2 = lj.advanced.leaves_with_paths(d2, is_leaf=lj.advanced.is_delta_leaf)[0]
    assert [p for p, _ in rows1] == [p for p, _ in rows2]
    for (path, e1), (_, e2) in zip(rows1, rows2):
        assert type(e1) is type(e2), path
        leaves1, tree1 = jax.tree_util.tree_flatten(e1)
        leaves2, tree2 = jax.tree_util.tree_flatten(e2)
        assert tree1 == tree2, path  # alpha, layout, rslora, layers, magnitude present
        for x, y in zip(leaves1, leaves2):
            assert x.dtype == y.dtype and x.shape == y.shape, path
            np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.parametrize(
    "config",
    [{}, {"use_dora": True}, {"bias": "all", "use_rslora": True}],
    ids=["lora", "dora", "bias+rslora"],
)
def test_conversions_round_trip_exactly(randomize, config):
    model = _model(randomize)
    graphdef, state = nnx.split(model)
    cfg = lj.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA, **config)
    layouts = lj.infer_layouts(lambda s, x: nnx.merge(graphdef, s)(x), state, TOKENS)
    _, delta = lj.init_lora(jax.random.key(0), state, cfg, layouts=layouts)
    delta = _random_factors(delta)
    lm = lora_nnx.from_delta(model, delta)
    graphdef2, base2, delta2 = lora_nnx.split(lm)
    _assert_same_delta(delta, delta2)
    assert graphdef2 == graphdef
    for (p, x), (_, y) in zip(
        lj.advanced.leaves_with_paths(state)[0], lj.advanced.leaves_with_paths(base2)[0]
    ):
        np.testing.assert_array_equal(x, y, err_msg=p)
    _, _, delta3 = lora_nnx.split(lora_nnx.from_delta(nnx.merge(graphdef2, base2), delta2))
    _assert_same_delta(delta, delta3)


def test_save_and_load_round_trip_through_the_file_format(randomize, tmp_path):
    lm = _lora_model(randomize)
    graphdef, base, delta = lora_nnx.split(lm)
    lj.save(tmp_path / "adapter", delta)
    loaded, _ = lj.load(tmp_path / "adapter", base)
    lm2 = lora_nnx.from_delta(nnx.merge(graphdef, base), loaded)
    lm.eval(), lm2.eval()
    np.testing.assert_array_equal(lm2(TOKENS), lm(TOKENS))


def test_merge_returns_the_original_class_with_dense_kernels(randomize):
    lm = _lora_model(randomize)
    lm.eval()
    plain = lora_nnx.merge(lm)
    assert type(plain) is Block
    assert not [p for p, _ in lj.advanced.leaves_with_paths(nnx.state(plain))[0] if "lora" in p]
    dense = _dense_by_hand(lm)
    np.testing.assert_allclose(plain.heads.kernel[...], dense["heads"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.fc.kernel[...], dense["fc"], rtol=1e-5, atol=1e-6)
    plain.eval()
    np.testing.assert_allclose(plain(TOKENS), lm(TOKENS), rtol=1e-5, atol=1e-5)


def test_base_kernels_are_never_modified(randomize):
    model = _model(randomize)
    before = _param_arrays(model)
    kernel_var = model.fc.kernel
    lm = lora_nnx.lora(
        model, lj.LoraConfig(targets=TARGETS, rank=RANK, alpha=ALPHA), jax.random.key(0), TOKENS
    )
    assert lm.model.fc.kernel is not kernel_var  # its own Variables
    assert not hasattr(model.fc, "kernel_lora_a")  # the given module is not adapted
    optimizer = nnx.Optimizer(lm, optax.sgd(0.5), wrt=nnx.LoRAParam)
    for _ in range(2):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(lm, TOKENS, LABELS)
        _opt_update(optimizer, lm, grads)
    plain = lora_nnx.merge(lm)
    assert not np.allclose(plain.fc.kernel[...], before["fc/kernel"])  # training did something
    nnx.update(plain, nnx.state(plain))  # writing into the merged module...
    plain.fc.kernel[...] = plain.fc.kernel[...] * 0
    graphdef, base, _ = lora_nnx.split(lm)
    for arrays in (
        _param_arrays(model),
        _param_arrays(lm),
        _param_arrays(nnx.merge(graphdef, base)),
    ):
        for path, x in before.items():
            got = arrays.get(path, arrays.get(f"model/{path}"))
            np.testing.assert_array_equal(got, x, err_msg=path)  # ...leaves every base alone


def test_bad_deltas_are_refused_with_the_leaf_named(randomize):
    model = _model(randomize)
    _, state = nnx.split(model)
    _, delta = lj.init_lora(jax.random.key(0), state, lj.LoraConfig(targets="fc/kernel", rank=2))
    _, wide = lj.init_lora(
        jax.random.key(0),
        nnx.split(nnx.Linear(8, 5, rngs=nnx.Rngs(0)))[1],
        lj.LoraConfig(targets="kernel", rank=2),
    )
    with pytest.raises(lj.LoraStructureError, match="leaf 'kernel'.*shape"):
        lora_nnx.from_delta(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), wide)
    stack = lj.stack_adapters([delta, delta])
    with pytest.raises(lj.LoraStructureError, match="fc/kernel.*stack"):
        lora_nnx.from_delta(model, stack)
    lm = lora_nnx.from_delta(model, delta)
    with pytest.raises(lj.LoraStructureError, match="fc/kernel_lora_a.*adapted already"):
        lora_nnx.from_delta(lm.model, delta)
    model.fc.kernel_lora_a = "taken"
    with pytest.raises(lj.LoraStructureError, match="fc/kernel.*kernel_lora_a"):
        lora_nnx.from_delta(model, delta)


def test_split_feeds_stacks_and_qlora(randomize):
    """The functional view serves adapter stacks, and a LoraModel can hold a quantized base."""
    lm1 = _lora_model(randomize)
    lm1.eval()
    graphdef, base, d1 = lora_nnx.split(lm1)
    d2 = _random_factors(d1, seed=9)
    lm2 = lora_nnx.from_delta(nnx.merge(graphdef, base), d2)
    lm2.eval()
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    mixed = lj.implicit(f)(
        base, lj.stack_adapters([d1, d2]), TOKENS, adapter_ids=jnp.asarray([1, 0, -1, 1])
    )
    plain = nnx.merge(graphdef, base)
    plain.eval()
    for row, want in enumerate([lm2(TOKENS), lm1(TOKENS), plain(TOKENS), lm2(TOKENS)]):
        np.testing.assert_allclose(mixed[row], want[row], rtol=1e-5, atol=1e-5)

    qbase = lj.quantize(
        base,
        r"(heads|out|fc)/kernel",
        scheme="int8",
        layouts={"heads/kernel": "ioo", "out/kernel": "iio"},
    )
    want = lj.implicit(f)(lj.dequantize(qbase), d1, TOKENS)
    assert float(jnp.abs(want - lm1(TOKENS)).max()) > 1e-4  # quantization moved the output
    qlm = lora_nnx.from_delta(nnx.merge(graphdef, qbase), d1)
    np.testing.assert_allclose(qlm(TOKENS), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lj.implicit(f)(qbase, d1, TOKENS), want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_draws_from_the_rngs_in_training_only(randomize):
    lm = _lora_model(randomize)
    graphdef, base, delta = lora_nnx.split(lm)
    dm = lora_nnx.from_delta(
        nnx.merge(graphdef, base), delta, dropout=0.5, rngs=nnx.Rngs(dropout=3)
    )
    dm.eval()
    lm.eval()
    np.testing.assert_array_equal(dm(TOKENS), lm(TOKENS))  # eval: no dropout
    dm.train()
    dm.model.eval()  # the base model's own layers (BatchNorm) stay in eval mode
    graphdef, base, _ = lora_nnx.split(dm)
    key = nnx.Rngs(dropout=3).dropout()  # the first key dm's stream draws
    want = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x), dropout=0.5)(
        base, delta, TOKENS, lora_dropout_key=key
    )
    got = dm(TOKENS)
    assert float(jnp.abs(got - lm(TOKENS)).max()) > 1e-3  # the mask changed the output
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(dm(TOKENS), got)  # the next call draws a new mask
    with pytest.raises(lj.LoraArgumentError, match="rngs"):
        lora_nnx.from_delta(nnx.merge(graphdef, base), delta, dropout=0.1)
