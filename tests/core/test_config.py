"""LoraConfig validation, per-pattern overrides and the LoRA scale."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import KernelLayout, LoraConfig, LoraConfigError, LoraError, LoraLayoutError

# --------------------------------------------------------------------------- rank / alpha


@pytest.mark.parametrize("rank", [0, -1, -8])
def test_rank_below_one(rank):
    with pytest.raises(LoraConfigError, match=r"rank must be an integer >= 1"):
        LoraConfig(targets="w", rank=rank)


@pytest.mark.parametrize("rank", [2.0, 2.5, "4", None])
def test_rank_not_int(rank):
    with pytest.raises(LoraConfigError, match=r"rank must be an integer"):
        LoraConfig(targets="w", rank=rank)


@pytest.mark.parametrize("rank", [True, False, np.bool_(True)])
def test_rank_bool_rejected(rank):
    with pytest.raises(LoraConfigError, match=r"rank must be an integer"):
        LoraConfig(targets="w", rank=rank)


def test_rank_numpy_int_accepted():
    assert LoraConfig(targets="w", rank=np.int32(4)).rank_for("w") == 4


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, -1e-9])
def test_alpha_not_positive(alpha):
    with pytest.raises(LoraConfigError, match=r"alpha must be a number > 0"):
        LoraConfig(targets="w", alpha=alpha)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), -float("inf"), np.float32("nan")])
def test_alpha_not_finite(alpha):
    with pytest.raises(LoraConfigError, match=r"^alpha must be"):
        LoraConfig(targets="w", alpha=alpha)


@pytest.mark.parametrize("alpha", [True, "16", None])
def test_alpha_not_a_number(alpha):
    with pytest.raises(LoraConfigError, match=r"alpha must be a number"):
        LoraConfig(targets="w", alpha=alpha)


def test_rank_pattern_value_checked_and_named():
    with pytest.raises(LoraConfigError, match=r"rank_pattern\['\.\*q'\] must be an integer >= 1"):
        LoraConfig(targets=".*", rank_pattern={".*q": 0})
    with pytest.raises(LoraConfigError, match=r"rank_pattern\['q'\]"):
        LoraConfig(targets=".*", rank_pattern={"q": True})


def test_alpha_pattern_value_checked_and_named():
    with pytest.raises(LoraConfigError, match=r"alpha_pattern\['v'\] must be a number > 0"):
        LoraConfig(targets=".*", alpha_pattern={"v": -2.0})
    with pytest.raises(LoraConfigError, match=r"alpha_pattern\['v'\] must be finite"):
        LoraConfig(targets=".*", alpha_pattern={"v": float("inf")})


# --------------------------------------------------------------------------- regexes


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(targets="(unclosed"), "targets"),
        (dict(targets=["ok", "[bad"]), "targets"),
        (dict(targets="w", exclude="*oops"), "exclude"),
        (dict(targets="w", exclude=["fine", "a{2,1}"]), "exclude"),
        (dict(targets="w", rank_pattern={"(x": 2}), "rank_pattern"),
        (dict(targets="w", alpha_pattern={"x)": 2.0}), "alpha_pattern"),
        (dict(targets="w", layouts={"?": "io"}), "layouts"),
    ],
)
def test_bad_regex_names_field_and_pattern(kwargs, field):
    with pytest.raises(LoraConfigError) as info:
        LoraConfig(**kwargs)
    msg = str(info.value)
    assert msg.startswith(field + ":"), msg
    assert "not a valid regular expression" in msg
    bad = [p for p in ("(unclosed", "[bad", "*oops", "a{2,1}", "(x", "x)", "?") if repr(p) in msg]
    assert len(bad) == 1, msg


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        LoraConfig(targets="w", rank=0)
    assert issubclass(LoraConfigError, LoraError) and issubclass(LoraError, ValueError)


# --------------------------------------------------------------------------- init / dtype / targets


@pytest.mark.parametrize("init", ["xavier", "Kaiming", "", "lecun", None])
def test_unknown_init(init):
    with pytest.raises(LoraConfigError, match=r"init must be one of .*kaiming.*gaussian.*swapped"):
        LoraConfig(targets="w", init=init)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "swapped"])
def test_known_init(init):
    assert LoraConfig(targets="w", init=init).init == init


@pytest.mark.parametrize("dtype", [jnp.int32, np.int8, jnp.bool_, "int16", np.uint8, "not-a-dtype"])
def test_non_float_dtype(dtype):
    with pytest.raises(LoraConfigError, match=r"dtype of the factors must be floating"):
        LoraConfig(targets="w", dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, "float32", np.float32])
def test_float_dtype_accepted(dtype):
    assert LoraConfig(targets="w", dtype=dtype).dtype is dtype


@pytest.mark.parametrize("targets", [[], ()])
def test_empty_targets(targets):
    with pytest.raises(LoraConfigError, match=r"targets is empty"):
        LoraConfig(targets=targets)


def test_targets_and_exclude_normalised_to_tuples():
    cfg = LoraConfig(targets=".*kernel", exclude="head/.*")
    assert cfg.targets == (".*kernel",)
    assert cfg.exclude == ("head/.*",)
    cfg = LoraConfig(targets=["a", "b"], exclude=["c"])
    assert cfg.targets == ("a", "b") and tuple(cfg.exclude) == ("c",)


def test_predicate_targets_kept():
    pred = lambda path, leaf: path.endswith("kernel")  # noqa: E731
    assert LoraConfig(targets=pred).targets is pred


def test_config_is_frozen():
    cfg = LoraConfig(targets="w")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3


# --------------------------------------------------------------------------- layouts field


def test_layout_strings_become_kernel_layouts():
    cfg = LoraConfig(
        targets=".*", layouts={".*q/kernel": "ioo", ".*conv/kernel": KernelLayout("iiio", "conv")}
    )
    assert cfg.layout_for("blk/q/kernel") == KernelLayout("ioo", "dense")
    assert cfg.layout_for("blk/conv/kernel") == KernelLayout("iiio", "conv")
    assert cfg.layout_for("blk/other/kernel") is None


def test_bad_layout_string_in_config():
    with pytest.raises(LoraLayoutError, match=r"'iox'"):
        LoraConfig(targets=".*", layouts={".*": "iox"})
    with pytest.raises(LoraLayoutError, match=r"needs at least one fan-in"):
        LoraConfig(targets=".*", layouts={".*": "ss"})


# --------------------------------------------------------------------------- first-match semantics


def test_rank_for_first_match_wins_and_is_full_match():
    cfg = LoraConfig(
        targets=".*",
        rank=8,
        rank_pattern={r".*/attn/q/kernel": 2, r".*/attn/.*": 4, r".*/q/kernel": 16},
    )
    assert cfg.rank_for("blk0/attn/q/kernel") == 2  # first of three matching patterns
    assert cfg.rank_for("blk0/attn/k/kernel") == 4
    assert cfg.rank_for("blk0/mlp/q/kernel") == 16
    assert cfg.rank_for("blk0/mlp/fc/kernel") == 8  # default
    # fullmatch: a pattern matching only a prefix or a substring does not apply
    cfg = LoraConfig(targets=".*", rank=8, rank_pattern={"attn": 2, "q/kernel": 3})
    assert cfg.rank_for("attn/q/kernel") == 8
    assert cfg.rank_for("xattn") == 8
    assert cfg.rank_for("attn") == 2


def test_rank_for_order_is_insertion_order():
    a = LoraConfig(targets=".*", rank_pattern={"x.*": 2, ".*y": 3})
    b = LoraConfig(targets=".*", rank_pattern={".*y": 3, "x.*": 2})
    assert a.rank_for("xy") == 2
    assert b.rank_for("xy") == 3


def test_alpha_for_first_match_and_float():
    cfg = LoraConfig(targets=".*", alpha=16, alpha_pattern={r"a/.*": 4, r".*/b": 32})
    assert cfg.alpha_for("a/b") == 4.0 and isinstance(cfg.alpha_for("a/b"), float)
    assert cfg.alpha_for("z/b") == 32.0
    assert cfg.alpha_for("z/c") == 16.0 and isinstance(cfg.alpha_for("z/c"), float)


def test_is_excluded_full_match():
    cfg = LoraConfig(targets=".*", exclude=[r"head/.*", r".*/bias"])
    assert cfg.is_excluded("head/kernel")
    assert cfg.is_excluded("blk/bias")
    assert not cfg.is_excluded("blk/head/kernel")
    assert not cfg.is_excluded("blk/bias2")


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize("rank", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("alpha", [1.0, 16.0, 7.5])
def test_scale_plain_and_rslora(rank, alpha):
    plain = LoraConfig(targets="w", rank=rank, alpha=alpha)
    rs = LoraConfig(targets="w", rank=rank, alpha=alpha, use_rslora=True)
    assert plain.scale_for(rank, alpha) == pytest.approx(alpha / rank, rel=1e-15)
    assert rs.scale_for(rank, alpha) == pytest.approx(alpha / math.sqrt(rank), rel=1e-15)
    if rank > 1:
        assert rs.scale_for(rank, alpha) > plain.scale_for(rank, alpha)
    else:
        assert rs.scale_for(rank, alpha) == plain.scale_for(rank, alpha)


def test_scale_example_values():
    assert LoraConfig(targets="w").scale_for(8, 16.0) == 2.0
    assert LoraConfig(targets="w", use_rslora=True).scale_for(16, 16.0) == 4.0
    assert LoraConfig(targets="w", use_rslora=True).scale_for(4, 6.0) == 3.0


@pytest.mark.parametrize("targets", [None, 5, [1, 2], {"a": 1}])
def test_targets_of_the_wrong_type(targets):
    with pytest.raises(LoraConfigError, match="targets must be a regex"):
        LoraConfig(targets=targets)


def test_dtype_none_is_rejected():
    with pytest.raises(LoraConfigError, match="dtype"):
        LoraConfig(targets="w", dtype=None)
