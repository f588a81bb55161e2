"""Expert-parallel LoRA on 8 simulated CPU devices (run by ``test_experts_sharding.py``).

A MoE block (router, dense dispatch of every token to every expert through an einsum that
keeps the experts axis, a one-hot top-1 combine) whose experts kernels ``(E, in, out)`` are
sharded along an ``expert`` mesh axis (and the fan-out along ``tensor``). For each mesh:
the delta's shardings derived from the base's (``A``, ``B`` follow the experts axis),
``init_lora_sharded``, a jitted LoRA train step through ``implicit(strict=True)``, and its
compiled HLO read for an all-gather of a whole experts kernel or any instruction that
computes an experts-kernel-sized tensor; a merge-on-the-fly step is the negative control.
The same experts through ``ragged_dot`` (tokens sorted by expert) with the experts axis
sharded 8 ways are checked the same way.
Prints one JSON line.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

E, D, F, T = 8, 16, 24, 32
INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
SHAPE = re.compile(r"(?:f32|bf16)\[([\d,]*)\]")
GATHERS = ("all-gather", "all-gather-start", "all-to-all", "collective-permute")
MAKERS = ("dot", "fusion", "add", "multiply", "reduce", "all-reduce", "reduce-scatter")


def block(p, x):
    experts = jnp.argmax(x @ p["router"], axis=-1)
    one_hot = jax.nn.one_hot(experts, E, dtype=x.dtype)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, p["up"]))  # every token, every expert
    y = jnp.einsum("tef,efd->ted", h, p["down"])
    return x + jnp.einsum("ted,te->td", y, one_hot)


def ragged_block(p, x):
    """The same experts through ragged_dot, tokens sorted by their top-1 expert."""
    experts = jnp.argmax(x @ p["router"], axis=-1)
    order = jnp.argsort(experts)
    groups = jnp.bincount(experts, length=E).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(x[order], p["up"], groups))
    y = jax.lax.ragged_dot(h, p["down"], groups)
    return x + jnp.zeros_like(y).at[order].set(y)


def loss_fn(p, x):
    return jnp.mean(block(p, x) ** 2)


def ragged_loss_fn(p, x):
    return jnp.mean(ragged_block(p, x) ** 2)


def findings(hlo: str) -> dict:
    """All-gathers whose result holds a whole experts kernel, and computing instructions
    whose result has an experts kernel's shape (any axis order, local shards too)."""
    kernel = {tuple(sorted((E, D, F)))}
    shards = {tuple(sorted(s)) for s in [(E, D, F), (E // 2, D, F), (E, D, F // 2), (E // 4, D, F)]}
    shards |= {tuple(sorted(s)) for s in [(E // 8, D, F), (E // 4, D, F // 2), (E // 8, D, F // 2)]}
    shards = {tuple(n for n in s if n != 1) for s in shards}
    gathers, makers = [], []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m:
            continue
        name, out, op = m.groups()
        if re.match(r"^((copy|bitcast|transpose)_)+fusion", name):
            continue  # moving the frozen kernel, as the frozen model's own step does
        dims = {
            tuple(sorted(int(d) for d in s.split(",") if d and d != "1"))
            for s in SHAPE.findall(out)
        }
        if op in GATHERS and dims & kernel:
            gathers.append(line.strip()[:200])
        if op in MAKERS and dims & shards:
            makers.append(line.strip()[:200])
    return {"full_gathers": gathers, "kernel_sized": makers}


def main() -> None:
    rng = np.random.default_rng(0)
    params = {
        "router": jnp.asarray(rng.standard_normal((D, E)), jnp.float32),
        "up": jnp.asarray(rng.standard_normal((E, D, F)) / 4, jnp.float32),
        "down": jnp.asarray(rng.standard_normal((E, F, D)) / 4, jnp.float32),
    }
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    layouts = lj.infer_layouts(loss_fn, params, x, lora_experts="up|down")
    config = lj.LoraConfig(targets=["up", "down"], rank=4)
    opt = optax.sgd(0.1)
    run = lj.implicit(loss_fn, strict=True)

    def step(delta, base, x):
        loss, g = jax.value_and_grad(lambda d: run(base, d, x))(delta)
        u, _ = opt.update(g, opt.init(delta), delta)
        return optax.apply_updates(delta, u), loss

    run_ragged = lj.implicit(ragged_loss_fn, strict=True)

    def ragged_step(delta, base, x):
        loss, g = jax.value_and_grad(lambda d: run_ragged(base, d, x))(delta)
        return jax.tree.map(lambda d, g: d - 0.1 * g, delta, g), loss

    def control(delta, base, x):
        loss, g = jax.value_and_grad(lambda d: loss_fn(lj.merge(base, d), x))(delta)
        return jax.tree.map(lambda d, g: d - 0.1 * g, delta, g), loss

    # one device: the reference
    _, delta0 = lj.init_lora(jax.random.key(0), params, config, layouts=layouts)
    delta0 = jax.tree.map(lambda v: v + 0.05, delta0)
    ref_delta, ref_loss = jax.jit(step)(delta0, params, x)
    ref_ragged_delta, ref_ragged_loss = jax.jit(ragged_step)(delta0, params, x)

    out = {"device_count": jax.device_count(), "layouts": {k: v.axes for k, v in layouts.items()}}
    for shape in [(8, 1), (4, 2)]:
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), ("expert", "tensor"))
        specs = {
            "router": P(),
            "up": P("expert", None, "tensor"),
            "down": P("expert", "tensor", None),
        }
        base_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        base = jax.device_put(params, base_sh)
        _, delta = lj.init_lora_sharded(jax.random.key(0), base, config, base_sh, layouts=layouts)
        delta = jax.tree.map(lambda v: v + 0.05, delta)
        delta_sh = lj.delta_shardings(base_sh, delta)
        x_sh = jax.device_put(x, NamedSharding(mesh, P()))
        jitted = jax.jit(
            step, in_shardings=(delta_sh, base_sh, None), out_shardings=(delta_sh, None)
        )
        compiled = jitted.lower(delta, base, x_sh).compile()
        new_delta, loss = compiled(delta, base, x_sh)
        ctrl = jax.jit(
            control, in_shardings=(delta_sh, base_sh, None), out_shardings=(delta_sh, None)
        )
        key = f"{shape[0]},{shape[1]}"
        out[key] = {
            "specs": {
                k: [list(v.a.sharding.spec), list(v.b.sharding.spec)]
                for k, v in new_delta.items()
                if v is not None
            },
            "loss_diff": abs(float(loss) - float(ref_loss)),
            "delta_diff": max(
                float(jnp.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(new_delta), jax.tree.leaves(ref_delta))
            ),
            "step": findings(compiled.as_text()),
            "control": findings(ctrl.lower(delta, base, x_sh).compile().as_text()),
        }
        if shape == (8, 1):  # the ragged_dot form, experts sharded 8 ways
            jitted = jax.jit(
                ragged_step, in_shardings=(delta_sh, base_sh, None), out_shardings=(delta_sh, None)
            )
            compiled = jitted.lower(delta, base, x_sh).compile()
            new_delta, loss = compiled(delta, base, x_sh)
            out["ragged"] = {
                "loss_diff": abs(float(loss) - float(ref_ragged_loss)),
                "delta_diff": max(
                    float(jnp.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(new_delta), jax.tree.leaves(ref_ragged_delta))
                ),
                "step": findings(compiled.as_text()),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
