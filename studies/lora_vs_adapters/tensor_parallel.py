"""Collectives in one tensor-parallel forward of the demo LM: base, LoRA, adapters.

Run by ``study.py`` as a subprocess, ``python -m studies.lora_vs_adapters.tensor_parallel``
(8 simulated CPU devices need ``XLA_FLAGS`` before JAX starts); prints one JSON object
``{config: {collective kind: count}}`` read off the compiled HLO.

Mesh ``(data 2, tensor 4)``: the model has 4 heads, so the tensor axis is 4
wide (8 would split heads). Megatron-style sharding: q/k/v and fc1 are
column-parallel (fan-out over ``tensor``), out and fc2 row-parallel (fan-in
over ``tensor``), everything else replicated, the batch over ``data``.
LoRA factors follow ``lora_jax.delta_shardings``. Adapters twice: replicated
(each tensor shard computes the whole adapter) and Megatron-sharded (down
column-parallel, up row-parallel, as a user would shard a small MLP).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax  # noqa: E402
from examples.common.pretrained import CONFIG, MODEL  # noqa: E402
from studies.lora_vs_adapters.baselines import adapter_apply, init_adapters  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
COLLECTIVE = re.compile(r"\s(" + "|".join(KINDS) + r")(?:-start)?\(")
COLUMN = re.compile(r"(attn/(q|k|v)|mlp/fc1)/")
ROW = re.compile(r"(attn/out|mlp/fc2)/kernel")
TP_LORA = lora_jax.LoraConfig(
    targets=[r".*/attn/(q|k|v|out)/kernel", r".*/mlp/(fc1|fc2)/kernel"],
    rank=8,
    alpha=64,
    init="gaussian",
)


def spec(path: str, ndim: int) -> P:
    if COLUMN.search(path):
        return P(None, "tensor") if ndim == 2 else P("tensor")
    return P("tensor", None) if ROW.search(path) else P()


def shardings(tree, mesh, rule=spec):
    leaves, treedef = lora_jax.advanced.leaves_with_paths(tree)
    return treedef.unflatten([NamedSharding(mesh, rule(p, x.ndim)) for p, x in leaves])


def adapter_spec(path: str, ndim: int) -> P:
    if "/down/" in path or path.startswith("down"):
        return P(None, "tensor") if ndim == 2 else P("tensor")
    return P("tensor", None) if ndim == 2 else P()


def count(fn, args, in_shardings) -> dict:
    """Collectives by kind in the compiled HLO of ``jit(fn)(*args)``."""
    hlo = jax.jit(fn, in_shardings=in_shardings).lower(*args).compile().as_text()
    found = COLLECTIVE.findall(hlo)
    counts = {k: found.count(k) for k in KINDS}
    counts["total"] = len(found)
    return counts


def main():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    tokens = jnp.zeros((8, CONFIG.seq_len), jnp.int32)
    params = MODEL.init(jax.random.key(0), tokens[:1])
    base, delta = lora_jax.init_lora(jax.random.key(1), params, TP_LORA)
    delta = jax.tree.map(lambda x: x + 0.01, delta)  # nonzero B: XLA cannot fold the branch away
    adapters = init_adapters(jax.random.key(2), 36)
    sb, sx = shardings(base, mesh), NamedSharding(mesh, P("data", None))
    sd = lora_jax.delta_shardings(sb, delta)
    merged = lora_jax.merge(base, delta)
    result = {
        "base": count(MODEL.apply, (base, tokens), (sb, sx)),
        "lora_merged": count(MODEL.apply, (merged, tokens), (sb, sx)),
        "lora_unmerged": count(lora_jax.implicit(MODEL.apply), (base, delta, tokens), (sb, sd, sx)),
        "adapters_replicated": count(
            adapter_apply,
            (base, adapters, tokens),
            (sb, shardings(adapters, mesh, lambda p, n: P()), sx),
        ),
        "adapters_sharded": count(
            adapter_apply,
            (base, adapters, tokens),
            (sb, shardings(adapters, mesh, adapter_spec), sx),
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
