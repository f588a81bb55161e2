"""The PEFT-like summary: per-kernel rows, counts and the text table."""

import math

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig

KEY = jax.random.key(0, impl="rbg")

SHAPES = {
    "blk": {
        "conv": {"kernel": (3, 4, 5), "bias": (5,)},
        "q": {"kernel": (4, 2, 3), "bias": (2, 3)},
        "stack": {"kernel": (3, 4, 5)},
        "fc": {"kernel": (4, 5), "bias": (5,)},
    },
    "tok": {"embedding": (4, 5)},
    "norm": {"scale": (5,)},
}
LAYOUTS = {
    r"blk/conv/kernel": KernelLayout("iio", "conv"),
    r"blk/q/kernel": "ioo",
    r"blk/stack/kernel": "sio",
}
# path: (kind, layout, rank, alpha, fan_in, fan_out, stack)
EXPECTED = {
    "blk/conv/kernel": ("conv", "iio", 2, 16.0, 3 * 4, 5, 1),
    "blk/fc/kernel": ("dense", "io", 3, 16.0, 4, 5, 1),
    "blk/q/kernel": ("dense", "ioo", 2, 6.0, 4, 2 * 3, 1),
    "blk/stack/kernel": ("dense", "sio", 2, 16.0, 4, 5, 3),
    "tok/embedding": ("embed", "io", 1, 16.0, 4, 5, 1),
}


def make(use_rslora=False):
    params = jax.tree.map(
        lambda s: jnp.ones(s, jnp.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
    )
    cfg = LoraConfig(
        targets=[r"blk/.*/kernel", r"tok/embedding"],
        rank=2,
        alpha=16.0,
        rank_pattern={r"blk/fc/.*": 3, r"tok/.*": 1},
        alpha_pattern={r"blk/q/.*": 6.0},
        layouts=LAYOUTS,
        use_rslora=use_rslora,
    )
    return lj.init_lora(KEY, params, cfg)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rows(use_rslora):
    base, delta = make(use_rslora)
    summary = lj.summarize(base, delta)
    assert [leaf.path for leaf in summary.leaves] == sorted(EXPECTED)  # params flattening order
    for leaf in summary.leaves:
        kind, layout, rank, alpha, fan_in, fan_out, stack = EXPECTED[leaf.path]
        shape = {
            p: s
            for p, s in lj.advanced.leaves_with_paths(
                SHAPES, is_leaf=lambda x: isinstance(x, tuple)
            )[0]
        }[leaf.path]
        assert (leaf.kind, leaf.layout, leaf.rank, leaf.alpha, leaf.shape) == (
            kind,
            layout,
            rank,
            alpha,
            shape,
        )
        want_scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        assert leaf.scale == pytest.approx(want_scale, rel=1e-12)
        assert leaf.params == rank * (fan_in + fan_out) * stack


def test_counts_and_percentage():
    base, delta = make()
    summary = lj.summarize(base, delta)
    n_base = sum(
        math.prod(s) for s in jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    )
    assert n_base == 60 + 5 + 24 + 6 + 60 + 20 + 5 + 20 + 5
    n_train = sum(r * (fi + fo) * st for _, _, r, _, fi, fo, st in EXPECTED.values())
    assert n_train == 2 * 17 + 3 * 9 + 2 * 10 + 3 * 2 * 9 + 1 * 9
    assert summary.base_params == n_base
    assert summary.trainable_params == n_train
    assert summary.total_params == n_base + n_train
    assert summary.trainable_percent == pytest.approx(
        100.0 * n_train / (n_base + n_train), rel=1e-12
    )
    # the counts agree with the arrays actually in the delta
    n_arrays = sum(x.size for x in jax.tree.leaves(delta))
    assert n_arrays == n_train


def test_table_text():
    base, delta = make()
    summary = lj.summarize(base, delta)
    text = summary.table()
    lines = text.splitlines()
    assert lines[0].split() == ["path", "kind", "shape", "layout", "r", "alpha", "scale", "params"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(EXPECTED) + 1
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert rows["blk/stack/kernel"] == [
        "blk/stack/kernel",
        "dense",
        "3x4x5",
        "sio",
        "2",
        "16",
        "8",
        "54",
    ]
    assert rows["blk/q/kernel"] == ["blk/q/kernel", "dense", "4x2x3", "ioo", "2", "6", "3", "20"]
    assert rows["tok/embedding"] == ["tok/embedding", "embed", "4x5", "io", "1", "16", "16", "9"]
    n_train, n_total = summary.trainable_params, summary.total_params
    pct = 100.0 * n_train / n_total
    assert (
        lines[-1]
        == f"trainable params: {n_train:,} || all params: {n_total:,} || trainable%: {pct:.4f}"
    )
    assert lines[-1] == "trainable params: 144 || all params: 349 || trainable%: 41.2607"


def test_thousands_separator_and_zero_division():
    s = lj.advanced.LoraSummary((), base_params=2_000_000, trainable_params=24_000)
    assert s.table().splitlines()[-1] == (
        "trainable params: 24,000 || all params: 2,024,000 || trainable%: 1.1858"
    )
    assert lj.advanced.LoraSummary((), 0, 0).trainable_percent == 0.0


def test_print_summary(capsys):
    base, delta = make()
    summary = lj.print_summary(base, delta)
    out = capsys.readouterr().out
    assert out == summary.table() + "\n"
    assert "trainable params: 144 || all params: 349 || trainable%: 41.2607" in out


def test_summary_of_empty_delta():
    params = {"w": jnp.ones((4, 5))}
    summary = lj.summarize(params, {"w": None})
    assert summary.leaves == () and summary.trainable_params == 0 and summary.base_params == 20
    assert (
        summary.table().splitlines()[-1]
        == "trainable params: 0 || all params: 20 || trainable%: 0.0000"
    )
