"""Experts kernels (``eio``, ``seio``) under ``implicit``: every way JAX MoE code uses them
(``ragged_dot``, an einsum that keeps, batches or contracts the experts axis, a gather of
each token's expert, a static ``w[i]``), in strict mode, against merge-on-the-fly written
out independently (``W + s * einsum('eir,ero->eio', A, B)``); ``infer_layouts`` on each
form; the compiled gradient holds no tensor of the experts kernel's size; errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from lora_jax import KernelLayout, LoraFactors
from lora_jax._implicit.rules import ragged_low_rank

E, D, F, T, R = 4, 6, 5, 10, 2
RTOL, ATOL = 2e-5, 2e-5
ROUTE = np.array([0, 2, 2, 3, 1, 0, 3, 3, 2, 1])  # each token's expert
GROUPS = np.bincount(ROUTE, minlength=E).astype(np.int32)  # tokens sorted by expert
ONE_HOT = np.eye(E, dtype=np.float32)[ROUTE]


def rand(rng, shape, scale=0.5):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def dense(w, a, b, scale):
    """The merged experts kernel, written out: ``W + s * A_e @ B_e`` per expert."""
    return w + scale * jnp.einsum("eir,ero->eio", a, b)


def close(got, want, what):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL, err_msg=what
    )


@pytest.fixture(scope="module")
def moe():
    rng = np.random.default_rng(0)
    w, a, b, x = rand(rng, (E, D, F)), rand(rng, (E, D, R)), rand(rng, (E, R, F)), rand(rng, (T, D))
    delta = {"w": LoraFactors(a, b, alpha=3.0, layout=KernelLayout("eio"))}
    return {"w": w}, delta, x


FORMS = {
    "ragged_dot": lambda p, x: lax.ragged_dot(x, p["w"], jnp.asarray(GROUPS)),
    "einsum_keeps_experts": lambda p, x: jnp.einsum("td,edf->tef", x, p["w"]),
    "einsum_one_hot_combine": lambda p, x: jnp.einsum("td,edf,te->tf", x, p["w"], ONE_HOT),
    "einsum_batches_experts": lambda p, x: jnp.einsum(
        "ted,edf->tef", jnp.broadcast_to(x[:, None], (T, E, D)), p["w"]
    ),
    "einsum_transposed": lambda p, x: jnp.einsum("tf,edf->ted", x[:, :F], p["w"]),
    "gather_per_token": lambda p, x: jnp.einsum("td,tdf->tf", x, p["w"][jnp.asarray(ROUTE)]),
    "static_index": lambda p, x: x @ p["w"][2],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_forward_and_factor_gradients_match_the_merged_kernel(moe, form):
    base, delta, x = moe
    fn, f = FORMS[form], delta["w"]
    run = lj.implicit(fn, strict=True)  # no fallback: every form has a low-rank rule

    def loss(d):
        y = run(base, d, x)
        return jnp.sum(jnp.sin(y)), y

    def loss_ref(a, b):
        y = fn({"w": dense(base["w"], a, b, f.scale)}, x)
        return jnp.sum(jnp.sin(y)), y

    @jax.jit
    def both(d):
        (_, y), g = jax.value_and_grad(loss, has_aux=True)(d)
        (_, y_ref), g_ref = jax.value_and_grad(loss_ref, (0, 1), has_aux=True)(d["w"].a, d["w"].b)
        return y, y_ref, g["w"], g_ref

    with jax.default_matmul_precision("highest"):
        y, y_ref, grads, (ga, gb) = both(delta)
    close(y, y_ref, form)
    close(grads.a, ga, f"{form}: dA")
    close(grads.b, gb, f"{form}: dB")
    assert float(jnp.abs(grads.a).max()) > 1e-3  # the gradient is not trivially zero


@pytest.mark.parametrize("one_hot", [True, False])
def test_both_forms_of_the_ragged_branch_agree(moe, one_hot):
    """The branch through two ragged dots (accelerators) and through one-hot masked dense
    matmuls (CPU): the same values and factor gradients, against the merged kernel."""
    base, delta, x = moe
    f, groups = delta["w"], jnp.asarray(GROUPS)

    def branch(a, b):
        return ragged_low_rank(x, a, b, groups, f.scale, dense=one_hot)

    def ref(a, b):
        return lax.ragged_dot(x, dense(jnp.zeros_like(base["w"]), a, b, f.scale), groups)

    with jax.default_matmul_precision("highest"):
        close(jax.jit(branch)(f.a, f.b), jax.jit(ref)(f.a, f.b), "values")
        g = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(branch(a, b))), (0, 1)))(f.a, f.b)
        g_ref = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(ref(a, b))), (0, 1)))(f.a, f.b)
    close(g[0], g_ref[0], "dA")
    close(g[1], g_ref[1], "dB")


INFERRED = {  # form: (without lora_experts, with it)
    "ragged_dot": ("eio", "eio"),
    "einsum_keeps_experts": ("oio", "eio"),  # looks like a multi-head projection
    "einsum_one_hot_combine": ("iio", "eio"),  # looks like an output projection
    "einsum_batches_experts": ("sio", "eio"),
    "einsum_transposed": ("ooi", "eoi"),
    "gather_per_token": ("eio", "eio"),
    "static_index": ("sio", "eio"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_infer_layouts_reads_the_experts_axis(moe, form):
    base, _, x = moe
    plain, hinted = INFERRED[form]
    assert lj.infer_layouts(FORMS[form], base, x)["w"].axes == plain
    assert lj.infer_layouts(FORMS[form], base, x, lora_experts="w")["w"].axes == hinted


# --------------------------------------------------------------------------- a MoE block


def moe_block(p, h, top_k=2):
    """Router, top-k with normalised weights, tokens sorted by expert, SwiGLU experts
    through ragged_dot, weighted combine back to token order."""
    n, e = h.shape[0], p["router"].shape[1]
    probs = jax.nn.softmax(h @ p["router"], axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    weights = weights / weights.sum(-1, keepdims=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    groups = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.repeat(h, top_k, axis=0)[order]
    gate = lax.ragged_dot(xs, p["gate"], groups)
    up = lax.ragged_dot(xs, p["up"], groups)
    y = lax.ragged_dot(jax.nn.silu(gate) * up, p["down"], groups)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, top_k, -1)
    return h + jnp.einsum("tkd,tk->td", y, weights)


def moe_stack(p, h):
    """Two MoE blocks, scan-stacked: experts kernels ``(layers, E, in, out)``."""
    return lax.scan(lambda c, layer: (moe_block(layer, c), None), h, p)[0]


@pytest.fixture(scope="module")
def stacked():
    rng = np.random.default_rng(1)
    hidden = 8
    params = {
        "router": rand(rng, (2, hidden, E)),
        "gate": rand(rng, (2, E, hidden, F)),
        "up": rand(rng, (2, E, hidden, F)),
        "down": rand(rng, (2, E, F, hidden)),
    }
    x = rand(rng, (T, hidden))
    layouts = lj.infer_layouts(moe_stack, params, x)
    config = lj.LoraConfig(
        targets=["router", "gate", "up", "down"], rank=R, rank_pattern={"down": 3}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, config, layouts=layouts)
    delta = jax.tree.map(lambda v: v + 0.1 * rand(rng, v.shape), delta)  # B != 0
    return base, delta, x, layouts


@pytest.mark.slow
def test_scanned_moe_stack_runs_strict_and_matches_merging(stacked):
    base, delta, x, layouts = stacked
    assert {p: lay.axes for p, lay in layouts.items()} == {
        "router": "sio",
        "gate": "seio",
        "up": "seio",
        "down": "seio",
    }
    assert delta["down"].a.shape == (2, E, F, 3) and delta["down"].b.shape == (2, E, 3, 8)
    run = lj.implicit(moe_stack, strict=True)

    def merged(d):  # independent of lj.merge: per layer and expert, W + s A B
        out = dict(base)
        for k in ("gate", "up", "down"):
            f = d[k]
            out[k] = base[k] + f.scale * jnp.einsum("leir,lero->leio", f.a, f.b)
        out["router"] = base["router"] + d["router"].scale * d["router"].a @ d["router"].b
        return out

    @jax.jit
    def both(d):
        y, y_ref = run(base, d, x), moe_stack(merged(d), x)
        g = jax.grad(lambda d: jnp.sum(run(base, d, x) ** 2))(d)
        g_ref = jax.grad(lambda d: jnp.sum(moe_stack(merged(d), x) ** 2))(d)
        return y, y_ref, g, g_ref

    with jax.default_matmul_precision("highest"):
        y, y_ref, g, g_ref = both(delta)
    close(y, y_ref, "forward")
    for k in g:
        close(g[k].a, g_ref[k].a, f"{k}: dA")
        close(g[k].b, g_ref[k].b, f"{k}: dB")


# --------------------------------------------------------------------------- compiled HLO

INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
SHAPE = re.compile(r"(?:f32|bf16)\[([\d,]*)\]")
#: Moving the frozen base kernel (the base product's own operand layout) is allowed.
LAYOUT_ONLY = re.compile(r"^(parameter|transpose|copy|bitcast)$")
LAYOUT_FUSION = re.compile(r"^((copy|bitcast|transpose)_)+fusion")


def kernel_sized(hlo: str, size: int) -> list[str]:
    """Instructions whose result has ``size`` elements and that compute it (anything but
    a move of the frozen kernel: parameter, transpose, copy, bitcast, their fusions)."""
    found = []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m:
            continue
        name, shapes, op = m.groups()
        sizes = {int(np.prod([int(d) for d in s.split(",") if d])) for s in SHAPE.findall(shapes)}
        layout = LAYOUT_ONLY.match(op) or (op == "fusion" and LAYOUT_FUSION.match(name))
        if size in sizes and not layout:
            found.append(line.strip()[:160])
    return found


@pytest.mark.slow
def test_gradient_step_has_no_experts_kernel_sized_tensor():
    """value_and_grad of the LoRA loss through ragged_dot and the one-hot einsum: no
    tensor with E*in*out elements is computed in the compiled program (the frozen kernel
    is only moved, as the frozen model's own backward does); the merge-on-the-fly step,
    the negative control, computes them."""
    e, d_in, d_out, tokens = 8, 24, 40, 16  # E*in*out = 7680 matches no other size
    rng = np.random.default_rng(2)
    w, x = rand(rng, (e, d_in, d_out)), rand(rng, (tokens, d_in))
    groups = jnp.asarray(np.full(e, tokens // e, np.int32))
    one_hot = jnp.asarray(np.eye(e, dtype=np.float32)[np.arange(tokens) % e])
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=4, layouts={"w": "eio"})
    )
    kernel = e * d_in * d_out
    for fn in (
        lambda p, x: lax.ragged_dot(x, p["w"], groups),
        lambda p, x: jnp.einsum("td,edf,te->tf", x, p["w"], one_hot),
    ):
        run = lj.implicit(fn, strict=True)
        step = jax.jit(jax.value_and_grad(lambda d, b, x, run=run: jnp.sum(run(b, d, x) ** 2)))
        assert kernel_sized(step.lower(delta, base, x).compile().as_text(), kernel) == []
        control = jax.jit(
            jax.value_and_grad(lambda d, b, x, fn=fn: jnp.sum(fn(lj.merge(b, d), x) ** 2))
        )
        assert kernel_sized(control.lower(delta, base, x).compile().as_text(), kernel)


# --------------------------------------------------------------------------- errors


def test_experts_axis_size_mismatch_names_the_kernel(moe):
    base, delta, x = moe
    f = delta["w"]
    wrong = {"w": f.replace(a=f.a[:3], b=f.b[:3])}  # 3 experts' factors, 4 experts
    with pytest.raises(lj.LoraError, match=r"'w'.*A\(3, 6, 2\) B\(3, 2, 5\).*\(4, 6, 5\)"):
        lj.implicit(FORMS["ragged_dot"])(base, wrong, x)


def test_group_sizes_that_do_not_sum_to_the_tokens_name_the_kernel(moe):
    base, delta, x = moe
    fn = lambda p, x: lax.ragged_dot(x, p["w"], jnp.asarray(GROUPS) + 1)  # noqa: E731
    with pytest.raises(lj.LoraArgumentError, match=r"kernel 'w'.*sum to 14.*10 rows"):
        lj.implicit(fn)(base, delta, x)


def test_dora_on_an_experts_kernel_is_refused_by_name(moe):
    base, _, _ = moe
    config = lj.LoraConfig(targets="w", rank=2, layouts={"w": "eio"}, use_dora=True)
    with pytest.raises(lj.LoraConfigError, match=r"'w'.*DoRA.*experts kernel"):
        lj.init_lora(jax.random.key(0), base, config)


@pytest.fixture(scope="module")
def two_adapters(moe):
    base, delta, _ = moe
    other = jax.tree.map(lambda v: -0.5 * v, delta)
    return [delta, other], lj.stack_adapters([delta, other])


def test_adapter_stacks_compose_with_a_static_expert_index(moe, two_adapters):
    base, _, x = moe
    deltas, stack = two_adapters
    ids = jnp.asarray(np.arange(T) % 2, jnp.int32)
    fn = FORMS["static_index"]
    got = lj.implicit(fn, strict=True)(base, stack, x, adapter_ids=ids)
    f = [d["w"] for d in deltas]
    each = [fn({"w": dense(base["w"], g.a, g.b, g.scale)}, x) for g in f]  # every row, each adapter
    want = jnp.where((ids == 0)[:, None], each[0], each[1])
    close(got, want, "per-example adapters through w[2]")


@pytest.mark.parametrize(
    "form, primitive",
    [
        ("ragged_dot", "ragged_dot_general"),
        ("einsum_keeps_experts", "dot_general"),
        ("gather_per_token", "gather"),
    ],
)
def test_adapter_stacks_over_experts_forms_are_refused_clearly(moe, two_adapters, form, primitive):
    base, _, x = moe
    ids = jnp.zeros((T,), jnp.int32)
    with pytest.raises(lj.LoraImplicitError, match=rf"'w'.*per-example.*'{primitive}'"):
        lj.implicit(FORMS[form])(base, two_adapters[1], x, adapter_ids=ids)
