"""Sharded LoRA fine-tuning on a (data, fsdp, tensor) device mesh with lora_jax.

A small decoder-only transformer (Flax linen) declares its kernels' logical
axes (``nn.with_logical_partitioning``); logical-axis rules map them onto a
``(data, fsdp, tensor)`` mesh: every kernel is FSDP-sharded on one axis and
tensor-parallel on the other, the batch is split over ``data x fsdp``. Then:

1. the base params are initialised **directly sharded** (``jit`` with
   ``out_shardings``), never whole on one device;
2. ``lora_jax.init_lora_sharded`` creates the delta directly in the shardings
   ``lora_jax.delta_shardings`` derives from the base's: ``A`` takes the
   kernel's fan-in spec, ``B`` its fan-out spec, the rank axis is replicated;
3. training runs through ``lora_jax.implicit`` (``x @ W + s * (x @ A) @ B``,
   ``W`` frozen; ``strict=True``, so no kernel is ever materialised), with
   Adam's state sharded like the delta and the train state donated (not while
   an async checkpoint may still read it);
4. the adapter is merged into the sharded params with ``jit`` whose
   ``out_shardings`` are the base's, so nothing is gathered;
5. with ``--out``, the adapter (a few KB) is gathered to the hosts, saved from
   process 0 (``lora_jax.save``), and loaded back onto the mesh.

Multi-process: the same program runs as several JAX processes, each feeding
its own slice of the batch (``jax.make_array_from_process_local_data``)::

    # 2 processes on this machine, 2 CPU devices each, one mesh over all 4:
    python -m examples.sharded_finetune --processes 2 --devices-per-process 2 --mesh 1,2,2
    # one process per host (TPU pod, SLURM: detected; else --coordinator/--num-processes/--process-id):
    python -m examples.sharded_finetune --distributed --mesh 2,4,4

On one CPU machine it simulates 8 devices by default::

    python -m examples.sharded_finetune                     # mesh 2x2x2
    python -m examples.sharded_finetune --mesh 1,1,8 --scan --remat --steps 20

``--scan`` stacks the blocks with ``nn.scan`` (kernels get a leading layer
axis, layout ``"sio"``), ``--remat`` rematerialises each block.
``--ckpt DIR`` checkpoints ``{delta, opt_state, step, rng}`` with orbax every
``--save-every`` steps (each process writes its own shards) and resumes from
the latest checkpoint: a killed job restarted with the same command ends
bit-identical to one never interrupted. ``--dropout`` turns on LoRA dropout
(its key is the state's ``rng``).
"""

from __future__ import annotations

from examples.common import distributed

if __name__ == "__main__":
    distributed.configure_devices()  # before JAX starts: --devices-per-process, else 8

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax  # noqa: E402

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes. Every logical name the model uses must appear here
# (lora_jax raises LoraShardingError for a missing one rather than replicating).
RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)
TARGETS = r".*/(q|k|v|o|up|down)/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 128
    d_model: int = 64
    num_heads: int = 8
    d_ff: int = 192
    num_layers: int = 2
    seq_len: int = 10
    scan: bool = False  # blocks stacked with nn.scan (kernels (layers, in, out))
    remat: bool = False  # each block under nn.remat


def _dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
    return nn.Dense(features, use_bias=False, kernel_init=init, name=name)


def constrain(x, sharding):
    """Pins an activation's sharding (batch over data x fsdp); a no-op without a mesh."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nn.Module):
    """Pre-LayerNorm causal attention + MLP. ``(carry, _) -> (carry, None)`` for nn.scan."""

    cfg: Config
    act_sharding: NamedSharding | None = None

    @nn.compact
    def __call__(self, x, _=None):  # x: (batch, seq, d_model)
        cfg = self.cfg
        b, t, d = x.shape
        h = cfg.num_heads
        y = nn.LayerNorm(use_bias=False, name="ln1")(x)
        # Column-parallel q/k/v (fsdp on d_model, tensor on heads), row-parallel o.
        q, k, v = (_dense(d, ("embed", "heads"), n)(y).reshape(b, t, h, d // h) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + _dense(d, ("heads", "embed"), "o")(att.reshape(b, t, d))
        y = nn.LayerNorm(use_bias=False, name="ln2")(x)
        y = jax.nn.gelu(_dense(cfg.d_ff, ("embed", "mlp"), "up")(y))
        x = x + _dense(d, ("mlp", "embed"), "down")(y)
        return constrain(x, self.act_sharding), None


class Transformer(nn.Module):
    cfg: Config
    act_sharding: NamedSharding | None = None  # e.g. NamedSharding(mesh, P(("data", "fsdp")))

    @nn.compact
    def __call__(self, tokens):  # (batch, seq) int32 -> (batch, seq, vocab) logits
        cfg = self.cfg
        # The table's feature axis stays unsharded: a lookup of rows split over fsdp would
        # come out sharded on features, not on the batch.
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", None))
        x = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init, name="embed")(tokens)
        x = constrain(x, self.act_sharding)
        block = nn.remat(Block) if cfg.remat else Block
        if cfg.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, self.act_sharding, name="layers")(x, None)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, self.act_sharding, name=f"layers_{i}")(x, None)
        x = nn.LayerNorm(use_bias=False, name="ln_f")(x)
        head_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        return nn.Dense(cfg.vocab_size, kernel_init=head_init, name="head")(x)


def lora_config(cfg: Config) -> lora_jax.LoraConfig:
    # Scanned kernels are (layers, in, out): the layer axis is stacked ("s").
    layouts = {r".*/layers/.*/kernel": "sio"} if cfg.scan else {}
    return lora_jax.LoraConfig(targets=TARGETS, rank=4, alpha=8.0, layouts=layouts)


def make_mesh(shape: tuple[int, int, int]) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first prod(shape) devices (Auto axes)."""
    n = math.prod(shape)
    if n > jax.device_count():
        raise SystemExit(f"mesh {shape} needs {n} devices, have {jax.device_count()}")
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), MESH_AXES)


def local_batch(cfg: Config, step: int, batch_size: int, seed: int = 0, rows=None):
    """Rows ``rows`` (default: all) of the global batch of ``step``: (inputs, targets), each
    (len(rows), seq).

    A synthetic language: each sequence follows ``x[i+1] = (5 x[i] + 3) mod V``
    from a random start, so the next token is a fixed function of the current.
    Each row is a function of ``(seed, step, row)`` alone, so a process reads
    only its own rows, and any process count and any resumed run see the same
    global batch.
    """
    rows = range(batch_size) if rows is None else rows
    start = np.array(
        [np.random.default_rng([seed, step, r]).integers(0, cfg.vocab_size) for r in rows]
    ).reshape(-1, 1)
    seq = [start]
    for _ in range(cfg.seq_len):
        seq.append((5 * seq[-1] + 3) % cfg.vocab_size)
    seq = np.concatenate(seq, axis=1).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def process_rows(sharding: NamedSharding, batch_size: int) -> range:
    """The rows of a ``(batch_size, ...)`` array sharded by ``sharding`` that this
    process's devices hold (contiguous for a batch split over mesh axes whose
    devices are ordered by process, as ``jax.devices()`` is)."""
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted({s[0].indices(batch_size)[:2] for s in index_map.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(h - lo_ for lo_, h in spans) != hi - lo:
        raise ValueError(f"this process's rows {spans} are not contiguous")
    return range(lo, hi)


def global_batch(cfg: Config, step: int, batch_size: int, sharding: NamedSharding, seed: int = 0):
    """The global batch as sharded arrays; this process reads only the rows it holds."""
    rows = process_rows(sharding, batch_size)
    return tuple(
        jax.make_array_from_process_local_data(sharding, x, (batch_size, *x.shape[1:]))
        for x in local_batch(cfg, step, batch_size, seed, rows)
    )


def abstract_variables(cfg: Config):
    """``jax.eval_shape`` of ``init``: ShapeDtypeStructs in LogicallyPartitioned boxes."""
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


def init_base(cfg: Config, key, shardings=None):
    """Unboxed base params; with ``shardings``, created directly sharded."""
    tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
    init = lambda k: nn.unbox(Transformer(cfg).init(k, tokens))  # noqa: E731
    if shardings is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=shardings)(key)


def loss_fn(delta, base, model: Transformer, inputs, targets, dropout=0.0, dropout_key=None):
    apply = lora_jax.implicit(model.apply, strict=True, dropout=dropout)
    logits = apply(base, delta, inputs, lora_dropout_key=dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(model: Transformer, optimizer, state_sh=None, base_sh=None, batch_sh=None):
    """``step((delta, opt_state), base, (inputs, targets)) -> ((delta, opt_state), loss)``.

    With shardings: jitted with them as in/out shardings and the train state
    donated (its buffers are reused for the new state). Without: plain jit.
    """

    def step(state, base, batch):
        delta, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(delta, base, model, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, delta)
        return (optax.apply_updates(delta, updates), opt_state), loss

    if state_sh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(batch_sh.mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_sh, base_sh, (batch_sh, batch_sh)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )


def initial_state(delta, opt_state, mesh: Mesh, seed: int = 0) -> dict:
    """The train state at step 0, ``{"delta", "opt_state", "step", "rng"}``: everything a
    resumed run needs (the rng as raw key data; the step and rng replicated on the mesh)."""
    replicated = NamedSharding(mesh, P())
    return {
        "delta": delta,
        "opt_state": opt_state,
        "step": jax.device_put(np.int32(0), replicated),
        "rng": jax.device_put(
            np.asarray(jax.random.key_data(jax.random.key(seed + 2))), replicated
        ),
    }


def state_shardings(delta_sh, opt_sh, mesh: Mesh) -> dict:
    replicated = NamedSharding(mesh, P())
    return {"delta": delta_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}


def make_state_step(
    model: Transformer, optimizer, state_sh, base_sh, batch_sh, *, dropout=0.0, donate=True
):
    """``step(state, base, (inputs, targets)) -> (state, loss)`` over :func:`initial_state`'s
    dict: LoRA dropout (if any) keyed by the state's ``rng``, the step counted. Donating the
    state is unsafe while an async checkpoint may still read it: ``donate=False`` then."""

    def step(state, base, batch):
        key, dropout_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        delta = state["delta"]
        loss, grads = jax.value_and_grad(loss_fn)(
            delta, base, model, *batch, dropout, dropout_key if dropout else None
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], delta)
        new = {
            "delta": optax.apply_updates(delta, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(key),
        }
        return new, loss

    return jax.jit(
        step,
        in_shardings=(state_sh, base_sh, (batch_sh, batch_sh)),
        out_shardings=(state_sh, NamedSharding(batch_sh.mesh, P())),
        donate_argnums=0 if donate else (),
    )


def checkpoint_manager(directory: Path):
    """orbax: async saves, the last two kept; every process writes its own shards."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def restore_latest(manager, state: dict) -> dict:
    """The latest complete checkpoint restored into ``state``'s shapes and shardings (each
    process reads only its shards), else ``state``."""
    import orbax.checkpoint as ocp

    latest = manager.latest_step()
    if latest is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def setup(cfg: Config, mesh: Mesh, key, optimizer=None, base=None):
    """Everything sharded: base, delta, optimizer state and their shardings.

    ``base``: host params to place on the mesh (e.g. a restored checkpoint);
    by default they are initialised directly sharded. ``optimizer`` defaults
    to Adam.
    """
    base_sh = lora_jax.param_shardings(abstract_variables(cfg), mesh, rules=RULES)
    base = init_base(cfg, key, base_sh) if base is None else jax.device_put(base, base_sh)
    base, delta = lora_jax.init_lora_sharded(
        jax.random.fold_in(key, 1), base, lora_config(cfg), base_sh
    )
    delta_sh = lora_jax.delta_shardings(base_sh, delta)
    optimizer = optax.adam(3e-2) if optimizer is None else optimizer
    opt_sh = lora_jax.opt_state_shardings(jax.eval_shape(optimizer.init, delta), delta_sh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(delta)
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
    model = Transformer(cfg, NamedSharding(mesh, P(("data", "fsdp"))))
    return dict(
        model=model,
        base=base,
        base_sh=base_sh,
        delta=delta,
        delta_sh=delta_sh,
        optimizer=optimizer,
        opt_state=opt_state,
        opt_sh=opt_sh,
        batch_sh=batch_sh,
    )


def spec_str(sharding) -> str:
    return str(tuple(sharding.spec)).replace("'", "")


def show_shardings(base, delta, opt_state, cfg: Config) -> None:
    rows = [("kernel", "shape", "base spec", "A spec / shard", "B spec / shard")]
    for path, leaf, f in lora_jax.advanced.align(base, delta)[0]:
        if f is None or path.split("/")[-2] not in ("q", "o", "up", "down"):
            continue
        if not cfg.scan and "layers_0" not in path:
            continue
        rows.append(
            (
                path,
                str(tuple(leaf.shape)),
                spec_str(leaf.sharding),
                f"{spec_str(f.a.sharding)} {f.a.sharding.shard_shape(f.a.shape)}",
                f"{spec_str(f.b.sharding)} {f.b.sharding.shard_shape(f.b.shape)}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    mu = opt_state[0].mu
    first = next(
        f
        for f in jax.tree.leaves(mu, is_leaf=lora_jax.advanced.is_factors)
        if lora_jax.advanced.is_factors(f)
    )
    print(
        f"  adam mu (first kernel): A {spec_str(first.a.sharding)}, B {spec_str(first.b.sharding)}"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--scan", action="store_true", help="stack the blocks with nn.scan")
    parser.add_argument("--remat", action="store_true", help="rematerialise each block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout rate")
    parser.add_argument("--out", type=Path, default=None, help="save the adapter to this directory")
    parser.add_argument("--ckpt", type=Path, default=None, help="orbax checkpoints (resumed)")
    parser.add_argument("--save-every", type=int, default=1, help="checkpoint every N steps")
    parser.add_argument("--log", type=Path, default=None, help="append 'step loss.hex()' lines")
    parser.add_argument(
        "--hlo", type=Path, default=None, help="write the compiled train step's HLO text here"
    )
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.processes > 1:  # the parent: start the processes, each runs this same main
        argv = sys.argv[1:] if argv is None else list(argv)
        status = distributed.launch_local(
            "examples.sharded_finetune", argv, args.processes, args.devices_per_process or 2
        )
        return {"exit_status": status}
    distributed.initialize(args)
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = make_mesh(shape)
    cfg = Config(num_layers=args.layers, scan=args.scan, remat=args.remat)
    say(
        f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} "
        f"devices, {jax.process_count()} process(es) with {jax.local_device_count()} each"
    )
    t0 = time.perf_counter()
    s = setup(cfg, mesh, jax.random.key(args.seed))
    base, delta, opt_state = s["base"], s["delta"], s["opt_state"]
    if lead:
        print(f"model: {cfg}\nshardings (fan-in spec -> A, fan-out spec -> B, rank replicated):")
        show_shardings(base, delta, opt_state, cfg)
    say(
        f"trainable params: {lora_jax.count_params(delta)} of "
        f"{lora_jax.count_params(base)} base params"
    )

    model = s["model"]
    state = initial_state(delta, opt_state, mesh, args.seed)
    manager = None if args.ckpt is None else checkpoint_manager(args.ckpt)
    if manager is not None:
        state = restore_latest(manager, state)
    start = int(state["step"])
    if start:
        say(f"resumed from the checkpoint of step {start}")
    step = make_state_step(
        model,
        s["optimizer"],
        state_shardings(s["delta_sh"], s["opt_sh"], mesh),
        s["base_sh"],
        s["batch_sh"],
        dropout=args.dropout,
        donate=manager is None,
    )
    batches = (
        global_batch(cfg, i, args.batch_size, s["batch_sh"], args.seed)
        for i in range(start, args.steps)
    )
    first = next(batches, None)
    if first is None:
        first = global_batch(cfg, start, args.batch_size, s["batch_sh"], args.seed)
        batches = iter(())
    else:
        batches = itertools.chain([first], batches)
    # Compile ahead of time: the same program jit would build, and its HLO can be inspected
    # (all-gathers, all-reduces: look for any of a whole kernel's shape).
    step = step.lower(state, base, first).compile()
    if args.hlo is not None and lead:
        hlo = step.as_text()
        lora_jax.advanced.atomic_write(args.hlo, lambda tmp: tmp.write_text(hlo))
    losses = []
    log = open(args.log, "a") if args.log is not None and lead else None  # noqa: SIM115
    for i, batch in enumerate(batches, start):
        state, loss = step(state, base, batch)  # a donated `state` is never reused
        losses.append(float(loss))
        if log is not None:
            log.write(f"{i + 1} {losses[-1].hex()}\n")
            log.flush()
        if manager is not None and ((i + 1) % args.save_every == 0 or i + 1 == args.steps):
            manager.save(i + 1, args=_save_args(state))
        if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
            say(f"step {i:3d}  loss {losses[-1]:.4f}")
    if log is not None:
        log.close()
    if manager is not None:
        manager.wait_until_finished()  # the last async save is committed before going on
        manager.close()
    delta = state["delta"]
    if losses:
        say(
            f"loss: first {losses[0]:.4f} last {losses[-1]:.4f} "
            f"({time.perf_counter() - t0:.1f}s with compiles)"
        )
    kept = all(
        leaf.a.sharding.is_equivalent_to(sh.a, leaf.a.ndim)
        for leaf, sh in zip(
            *(
                [
                    x
                    for x in jax.tree.leaves(t, is_leaf=lora_jax.advanced.is_factors)
                    if lora_jax.advanced.is_factors(x)
                ]
                for t in (delta, s["delta_sh"])
            )
        )
    )
    say(f"delta keeps its derived shardings after training: {kept}")

    # Merge without gathering: each device adds its shard of s*A@B to its shard of W.
    merged = jax.jit(lora_jax.merge, out_shardings=s["base_sh"])(base, delta)
    same = jax.tree.all(
        jax.tree.map(lambda m, b: m.sharding.is_equivalent_to(b.sharding, m.ndim), merged, base)
    )
    inputs, _ = global_batch(cfg, 0, args.batch_size, s["batch_sh"], args.seed)
    replicated = NamedSharding(mesh, P())
    fwd = jax.jit(model.apply)(merged, inputs)
    imp = jax.jit(lora_jax.implicit(model.apply))(base, delta, inputs)
    diff = float(jax.jit(lambda a, b: jnp.max(jnp.abs(a - b)), out_shardings=replicated)(fwd, imp))
    say(
        f"merged params keep the base's shardings: {same}; "
        f"max |merged forward - implicit forward|: {diff:.2e}"
    )

    # The adapter is small: gather it to every host, write it from process 0. (The orbax
    # checkpoint above holds it sharded, each shard written by the host holding it.)
    restored_ok = None
    if args.out is not None:
        host_delta = multihost_utils.process_allgather(delta, tiled=True)
        if lead:
            lora_jax.save(args.out, host_delta, lora_config(cfg))
            print(
                f"saved the adapter ({lora_jax.advanced.tree_bytes(host_delta)} bytes) to {args.out}"
            )
        multihost_utils.sync_global_devices("adapter saved")
        # Loading onto the mesh: read on every host, then place with the delta's shardings.
        restored, _ = lora_jax.load(args.out, base=base)
        restored = jax.device_put(restored, s["delta_sh"])
        equal = jax.jit(
            lambda x, y: jnp.all(
                jnp.stack(
                    [jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
                )
            ),
            out_shardings=replicated,
        )(restored, delta)
        alike = jax.tree.all(jax.tree.map(lambda x, y: x.sharding == y.sharding, restored, delta))
        restored_ok = bool(equal) and bool(alike)
        say(f"adapter reloaded onto the mesh, equal and sharded alike: {restored_ok}")
    return dict(
        losses=losses,
        start_step=start,
        merged_diff=diff,
        shardings_kept=kept,
        merged_sharded=same,
        restored=restored_ok,
        base=base,
        delta=delta,
        merged=merged,
        state=state,
        setup=s,
        mesh=mesh,
        config=cfg,
    )


def _save_args(state):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(state)


if __name__ == "__main__":
    sys.exit(main().get("exit_status", 0))
