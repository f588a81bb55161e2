"""Mixed-adapter serving on 8 CPU devices, for tests/serving/test_serving.py (run as a subprocess).

A small 2-layer MLP LM-like model, its base kernels sharded over a
(data=2, model=4) mesh (fan-out of the first kernel, fan-in of the second, i.e.
tensor parallel), the batch and ``adapter_ids`` over ``data``. Checks, printed
as one JSON line:

* the jitted mixed-adapter forward equals the single-device result (auto axes);
* under explicit axes (where this JAX has them), the gather of each
  example's factors has the documented spec ``P(ids_spec, *stack_spec[1:])``
  (read off its type inside ``jit``) and the right values. (The model's own
  sharded contractions would need ``out_sharding`` under explicit axes; the
  forward is checked under auto axes.)
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import lora_jax as lj  # noqa: E402
from lora_jax._serving import example_view as _example_view  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def fn(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def main():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
    }
    deltas = []
    for i, r in enumerate([2, 4, 3]):
        _, d = lj.init_lora(jax.random.key(i), params, lj.LoraConfig(targets="w.", rank=r))
        leaves, tdef = jax.tree_util.tree_flatten(d)
        deltas.append(
            jax.tree_util.tree_unflatten(
                tdef, [jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
            )
        )
    stack = lj.stack_adapters(deltas, slots=4)
    x = jnp.asarray(rng.standard_normal((8, 5, 16)), jnp.float32)
    ids = jnp.asarray([0, 1, 2, -1, 3, 1, 0, 2], jnp.int32)
    serve = lj.implicit(fn, strict=True)
    ref = np.asarray(jax.jit(serve)(params, stack, x, adapter_ids=ids))
    errors, seen = {}, {}

    def place(mesh):
        base = {
            "w1": jax.device_put(params["w1"], NamedSharding(mesh, P(None, "model"))),
            "w2": jax.device_put(params["w2"], NamedSharding(mesh, P("model", None))),
        }
        specs = lj.delta_shardings(base, deltas[0])
        placed = jax.tree.map(
            lambda s, sh: jax.device_put(s, NamedSharding(mesh, P(None, *sh.spec))),
            {k: (v.a, v.b) for k, v in stack.items()},
            {k: (specs[k].a, specs[k].b) for k in stack},
        )
        st = {k: v.replace(a=placed[k][0], b=placed[k][1]) for k, v in stack.items()}
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ids_s = jax.device_put(ids, NamedSharding(mesh, P("data")))
        return base, st, xs, ids_s

    auto = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    out = jax.jit(serve)(*place(auto)[:3], adapter_ids=place(auto)[3])
    errors["auto"] = float(np.abs(np.asarray(out) - ref).max())

    axis_type = getattr(jax.sharding, "AxisType", None)
    want = gathered = None
    if axis_type is not None and hasattr(jax, "typeof"):
        explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type.Explicit,) * 2)
        _, st, _, ids_s = place(explicit)
        index, _ = _example_view.example_ids(ids, 4)
        index = jax.device_put(index, NamedSharding(explicit, P("data")))

        @jax.jit
        def gathered_spec(a, index, ids_):
            g = _example_view.gather_slots(a, index, ids_)
            seen["stack"] = [str(e) for e in jax.typeof(a).sharding.spec]
            seen["spec"] = [str(e) for e in jax.typeof(g).sharding.spec]
            return g

        g = gathered_spec(st["w1"].b, index, ids_s)
        errors["explicit_gather"] = float(
            np.abs(np.asarray(g) - np.asarray(stack["w1"].b)[index]).max()
        )
        gathered = seen["spec"]
        want = ["data"] + seen["stack"][1:]
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "max_abs_err": errors,
                "gathered_spec": gathered,
                "want_spec": want,
            }
        )
    )


if __name__ == "__main__":
    main()
