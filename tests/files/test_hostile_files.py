"""Hostile adapter files: every broken or lying lora_jax / PEFT adapter directory ends in a
``LoraFileError`` naming the file, within bounded memory, bytes read and compilations (work,
not time), and nothing runs code.

Each case is one adapter directory, mutated (byte flips, truncations at every region,
JSON fields replaced one by one, safetensors headers whose shapes, offsets, dtypes or
names lie, repeated keys, extra tensors), then read by every entry point of its format.
The outcome must be a successful read (a well-formed file after all) or a
:class:`~lora_jax.LoraFileError` (``LoraBaseMismatchError`` is one) whose message names
the file; a header that lies must be refused. Quantized base files (``load_base``) get
the same treatment of their metadata. ``pickle`` is disabled while reading.
``test_zz_report`` prints the figures.
"""

from __future__ import annotations

import ast
import collections
import json
import math
import pickle
import re
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import LoraFileError
from lora_jax.debug import CompileCounter

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"
PKG = Path(lj.__file__).parent
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
READ_FACTOR, READ_SLACK = 2, 64 << 10  # bytes one read may read: twice the files + 64 KiB
MAX_COMPILES = 16  # XLA compilations one read may trigger (measured: at most 6)
SLACK = 4 << 20  # bytes tracemalloc may see beyond the files' and the model's sizes
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PEAK = {"bytes": 0, "case": ""}
WORK = {"bytes read / file bytes": 0.0, "compilations per read": 0}


def bytes_read() -> int:
    """This process's bytes read by system calls so far (Linux ``/proc/self/io`` ``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


FAST = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- the two sources


def lora_jax_source(root: Path) -> tuple[Path, Any]:
    """A lora_jax adapter with a plain, a DoRA and a stacked-with-layers target; its base."""
    rng = np.random.default_rng(0)
    base = {
        "params": {
            "fc": {
                "kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                "bias": jnp.zeros(4),
            },
            "emb": {"embedding": jnp.asarray(rng.standard_normal((10, 4)), jnp.bfloat16)},
            "stack": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32)},
        }
    }
    cfg = lj.LoraConfig(
        targets=[".*fc/kernel", ".*embedding"],
        rank=2,
        alpha=4,
        use_dora=True,
        init="swapped",
        dtype=jnp.float32,
    )
    _, delta = lj.init_lora(jax.random.key(0), base, cfg)
    cfg2 = lj.LoraConfig(
        targets=".*stack/kernel", rank=2, layouts={".*": "sio"}, layers=[0, 2], init="swapped"
    )
    _, d2 = lj.init_lora(jax.random.key(1), base, cfg2)
    delta["params"]["stack"]["kernel"] = d2["params"]["stack"]["kernel"]
    lj.save(root, delta, cfg)
    return root, base


def peft_source(root: Path, name: str) -> tuple[Path, Any]:
    """A copy of a committed PEFT fixture and Flax params shaped for it."""
    root.mkdir(parents=True)
    for f in (CFG, WTS):
        shutil.copy(FIXTURES / name / f, root / f)
    shapes = {
        "mlp_lora": {"fc1": {"kernel": (6, 8)}, "fc2": {"kernel": (8, 5)}},
        "conv2d_dora": {"conv": {"kernel": (3, 2, 3, 4)}},
    }[name]
    params = {
        "params": jax.tree.map(
            lambda s: jnp.ones(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
        )
    }
    return root, params


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "lora_jax": lora_jax_source(root / "lj"),
        "peft": peft_source(root / "peft", "mlp_lora"),
        "peft_dora": peft_source(root / "peft_dora", "conv2d_dora"),
    }


def readers(fmt: str, params: Any) -> list[Callable[[Path], Any]]:
    """Every way a user reads a directory of this format."""
    if fmt == "lora_jax":
        return [
            lambda d: lj.load(d),
            lambda d: lj.load(d, base=params),
            lambda d: lj.load(d, verify=False, check_finite=False),
        ]
    return [
        lambda d: lj.import_peft(d),
        lambda d: lj.import_peft(d, params),
        lambda d: lj.import_peft(d, params, check_finite=False),
    ]


# --------------------------------------------------------------------------- the oracle


def _no_pickle(*args, **kwargs):
    raise AssertionError("pickle was used while reading an adapter file")


@pytest.fixture(autouse=True)
def pickle_forbidden(monkeypatch):
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, _no_pickle)
    monkeypatch.setattr(np, "load", _no_pickle)


def model_bytes(params: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def check_case(
    kind: str, fmt: str, directory: Path, params: Any, keys: tuple = (), expect: str | None = None
) -> None:
    """Reads ``directory`` every way; each read succeeds or raises a LoraFileError naming a file
    (and, given ``keys``, one of them: the keys on the path to a mutated JSON field). Given
    ``expect`` (``"read"`` or ``"LoraFileError"``), every read must have that outcome."""
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    for read in readers(fmt, params):
        tracemalloc.start()
        bytes0 = bytes_read()
        try:
            with CompileCounter() as compiles:
                read(directory)
            outcome = "read"
        except LoraFileError as e:
            outcome = "LoraFileError"
            msg = str(e)
            assert str(directory) in msg and (CFG in msg or WTS in msg), msg
            assert not keys or any(k in msg for k in keys), (keys, msg)
        except Exception as e:  # noqa: BLE001 - any other outcome is the failure being tested
            raise AssertionError(f"{kind} on {fmt}: {type(e).__name__}: {e}") from e
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert expect in (None, outcome), f"{kind} on {fmt}: {outcome}, expected {expect}"
        # bounded work, not time: bytes read (system calls, so Rust's reads count too) and
        # XLA compilations
        read_bytes = bytes_read() - bytes0
        assert read_bytes <= READ_FACTOR * size + READ_SLACK, (kind, fmt, read_bytes, size)
        assert compiles.count <= MAX_COMPILES, (kind, fmt, compiles.count)
        WORK["bytes read / file bytes"] = max(WORK["bytes read / file bytes"], read_bytes / size)
        WORK["compilations per read"] = max(WORK["compilations per read"], compiles.count)
        assert peak <= 2 * size + model_bytes(params) + SLACK, (kind, fmt, peak, size)
        if peak > PEAK["bytes"]:
            PEAK.update(bytes=peak, case=f"{fmt}/{kind}", file_bytes=size)
        STATS[fmt][outcome] += 1
    STATS[fmt]["cases"] += 1


def mutated(sources, fmt: str, tmp_path: Path, name: str, data: bytes) -> Path:
    """A copy of the ``fmt`` source directory in which file ``name`` holds ``data``."""
    src, _ = sources[fmt]
    d = tmp_path / f"case-{fmt}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(src, d)
    (d / name).write_bytes(data)
    return d


def run(sources, fmt, tmp_path, kind, name, data, keys=(), expect=None):
    check_case(
        kind, fmt, mutated(sources, fmt, tmp_path, name, data), sources[fmt][1], keys, expect
    )


FORMATS = ["lora_jax", "peft", "peft_dora"]


# --------------------------------------------------------------------------- byte-level cases


@pytest.mark.parametrize("fmt", FORMATS)
@FAST
@given(data=st.data())
def test_byte_flips(sources, fmt, tmp_path, data):
    name = data.draw(st.sampled_from([CFG, WTS]))
    raw = bytearray((sources[fmt][0] / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    run(sources, fmt, tmp_path, "byte flip", name, bytes(raw))


def regions(raw: bytes, name: str) -> list[int]:
    """Cut points at the start, middle and end of every region of a file: the safetensors
    length field, header and each tensor's data; JSON: each line."""
    if name == CFG:
        ends = [m.end() for m in re.finditer(b"\n", raw)]
        starts = [0] + ends
    else:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        spans = [(0, 8), (8, 8 + n)] + [
            (8 + n + a, 8 + n + b) for a, b in (v["data_offsets"] for v in header.values())
        ]
        starts = [a for a, _ in spans] + [b for _, b in spans]
        starts += [(a + b) // 2 for a, b in spans]
    return sorted({c for s in starts for c in (s - 1, s, s + 1) if 0 <= c < len(raw)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncation_at_every_region(sources, fmt, tmp_path):
    for name in (CFG, WTS):
        raw = (sources[fmt][0] / name).read_bytes()
        for cut in regions(raw, name)[:: 1 if name == WTS else 4]:
            run(sources, fmt, tmp_path, "truncation", name, raw[:cut])


@pytest.mark.parametrize("fmt", FORMATS)
@FAST
@given(data=st.data())
def test_random_truncations_and_garbage(sources, fmt, tmp_path, data):
    name = data.draw(st.sampled_from([CFG, WTS]))
    raw = (sources[fmt][0] / name).read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=64))
    run(sources, fmt, tmp_path, "truncation+garbage", name, raw[:cut] + tail)


# --------------------------------------------------------------------------- JSON field by field

HOSTILE_VALUES = [
    None,
    True,
    0,
    -1,
    2,
    10**12,
    2**64,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x" * 300,
    "../../etc/passwd",
    [],
    [1, "a"],
    {},
    {"k": [None]},
]


def json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) to a value in a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, prefix + (i,))
    return out


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("fmt", FORMATS)
def test_json_mutated_field_by_field(sources, fmt, tmp_path):
    doc = json.loads((sources[fmt][0] / CFG).read_text())
    paths = json_paths(doc)
    rng = np.random.default_rng(len(paths))
    for i, path in enumerate(paths):
        # Each field gets 4 of the hostile values (rotating, so every value meets many fields),
        # plus its removal at the top level and an unknown key beside it.
        for j in range(4):
            value = HOSTILE_VALUES[(4 * i + j) % len(HOSTILE_VALUES)]
            text = json.dumps(replaced(doc, path, value)).encode()
            keys = tuple(k for k in path if isinstance(k, str))  # the error names one of them
            run(sources, fmt, tmp_path, "json field", CFG, text, keys)
        if len(path) == 1:
            text = json.dumps({k: v for k, v in doc.items() if k != path[0]}).encode()
            run(sources, fmt, tmp_path, "json field removed", CFG, text)
    extra = dict(doc, unknown_key={"nested": [1, 2]}, **{"": rng.standard_normal()})
    run(sources, fmt, tmp_path, "json unknown key", CFG, json.dumps(extra).encode())


@pytest.mark.parametrize("fmt", FORMATS)
def test_json_structural_attacks(sources, fmt, tmp_path):
    text = (sources[fmt][0] / CFG).read_text()
    first_key = re.search(r'"(\w+)":', text).group(0)
    attacks = {
        "deep nesting": "[" * 200_000 + "]" * 200_000,
        "huge integer": '{"r": ' + "9" * 5000 + "}",
        "repeated key": text.replace("{", "{" + first_key + " 1, ", 1),
        "not an object": "[1, 2, 3]",
        "not utf-8": "\udcff",
        "empty": "",
    }
    for kind, body in attacks.items():
        run(sources, fmt, tmp_path, f"json {kind}", CFG, body.encode("utf-8", "surrogateescape"))


# --------------------------------------------------------------------------- lying safetensors headers


def st_split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_join(header: dict | str, data: bytes, length: int | None = None) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def header_lies(raw: bytes) -> dict[str, bytes]:
    """Files whose header contradicts its data, one lie each."""
    header, data = st_split(raw)
    keys = [k for k in header if k != "__metadata__"]
    k0, k1 = keys[0], keys[-1]

    def edit(key, **fields):
        h = json.loads(json.dumps(header))
        h[key].update(fields)
        return st_join(h, data)

    def rename(old, new):
        h = {(new if k == old else k): v for k, v in header.items()}
        return st_join(h, data)

    e0 = header[k0]
    dup = json.dumps(header)[:-1] + f', "{k0}": ' + json.dumps(e0) + "}"
    tb = [1 << 20, 1 << 20]  # 4 TiB of float32
    return {
        "terabyte shape": edit(k0, shape=tb),
        "terabyte shape and offsets": edit(k0, shape=tb, data_offsets=[0, 4 << 40]),
        "offsets past the end": edit(k1, data_offsets=[e0["data_offsets"][0], len(data) + 64]),
        "negative offset": edit(k0, data_offsets=[-8, e0["data_offsets"][1]]),
        "reversed offsets": edit(k0, data_offsets=e0["data_offsets"][::-1]),
        "overlapping offsets": edit(k1, data_offsets=e0["data_offsets"]),
        "shape of another size": edit(k0, shape=[3, 3]),
        "negative dim": edit(k0, shape=[-1] + e0["shape"][1:]),
        "float dim": edit(k0, shape=[1.5] + e0["shape"][1:]),
        "dtype BF16 (half the bytes)": edit(k0, dtype="BF16"),
        "dtype I32 (same bytes)": edit(k0, dtype="I32"),
        "dtype U8 (4x the elements)": edit(
            k0, dtype="U8", shape=[e0["shape"][0] * 4] + e0["shape"][1:]
        ),
        "unknown dtype": edit(k0, dtype="F128"),
        "name with ..": rename(k0, "../" + k0),
        "name with / and ..": rename(k0, "/etc/../" + k0.replace(".", "/")),
        "empty name": rename(k0, ""),
        "repeated key": st_join(dup, data),
        "header length past the end": st_join(header, data, length=len(raw) * 2),
        "header length 2**64-1": st_join(header, data, length=2**64 - 1),
        "header length 0": st_join(header, data, length=0),
        "metadata not strings": st_join(dict(header, __metadata__={"format": 1}), data),
        "header not an object": st_join("[]", data),
        "data appended": st_join(header, data + b"\0" * 16),
    }


def extra_tensors(raw: bytes) -> dict[str, bytes]:
    """Well-formed files with tensors the adapter does not list, and retyped tensors."""
    header, data = st_split(raw)
    k0 = next(k for k in header if k != "__metadata__")
    e0 = header[k0]
    n0 = e0["data_offsets"][1] - e0["data_offsets"][0]
    out = {}
    for name in (
        "model.embed_tokens.weight",
        "base_model.model.fc1.base_layer.weight",
        "base_model.model.fc1.lora_A.weight.extra",
        "../outside.lora_A.weight",
    ):
        h = dict(
            header,
            **{name: {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}},
        )
        out[f"extra tensor {name}"] = st_join(h, data + b"\0" * 8)
    # the first tensor's bytes re-read as float16 with twice the elements: a consistent file
    # whose dtype contradicts the config (lora_jax) or the other factor (PEFT)
    h = json.loads(json.dumps(header))
    h[k0].update(dtype="F16", shape=[n0 // 2])
    out["dtype F16, reshaped"] = st_join(h, data)
    return out


FILE_LEVEL = {
    "header length past the end",
    "header length 2**64-1",
    "header length 0",
    "header not an object",
    "data appended",
    "metadata not strings",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_lying_headers_and_extra_tensors(sources, fmt, tmp_path):
    raw = (sources[fmt][0] / WTS).read_bytes()
    names = [k for k in st_split(raw)[0] if k != "__metadata__"]
    for kind, body in {**header_lies(raw), **extra_tensors(raw)}.items():
        # a lie about one tensor is reported with a tensor's name (the lie's, or one it displaced)
        keys = () if kind in FILE_LEVEL else tuple(names) + ("''", "outside", kind.split()[-1])
        # every case lies (about sizes, offsets, dtypes, names or tensors the adapter has not):
        # each is refused, never read as data
        run(sources, fmt, tmp_path, kind, WTS, body, keys, expect="LoraFileError")


def test_terabyte_claim_is_refused_before_reading(sources, tmp_path):
    raw = (sources["peft"][0] / WTS).read_bytes()
    d = mutated(sources, "peft", tmp_path, WTS, header_lies(raw)["terabyte shape and offsets"])
    tracemalloc.start()
    bytes0 = bytes_read()
    with pytest.raises(
        LoraFileError,
        match=rf"{WTS}: not a readable safetensors file: tensor "
        r"'base_model\.model\.fc1\.lora_A\.weight'",
    ):
        lj.import_peft(d)
    read_bytes = bytes_read() - bytes0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # refused from the header: no more read than the config and the header (and 64 KiB)
    header = 8 + int.from_bytes((d / WTS).read_bytes()[:8], "little")
    assert read_bytes <= (d / CFG).stat().st_size + header + (64 << 10), read_bytes
    assert peak < 1 << 20


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    "fmt,fixture", [("peft", "mlp_dora"), ("peft", "conv2d_dora"), ("lora_jax", None)]
)
def test_a_nan_or_inf_in_any_tensor_is_refused(sources, tmp_path, fmt, fixture):
    """One NaN or Inf in any tensor (factors and DoRA magnitudes alike) is a LoraFileError
    naming the file and the tensor; ``check_finite=False`` reads it."""
    from safetensors.numpy import load_file, save_file

    src = sources["lora_jax"][0] if fixture is None else FIXTURES / fixture
    tensors = load_file(str(src / WTS))
    assert any("magnitude" in k for k in tensors), sorted(tensors)  # DoRA: magnitudes included
    for key in sorted(tensors):
        for bad in (np.nan, np.inf):
            d = tmp_path / f"{key.replace('/', '_')}-{bad}"
            shutil.copytree(src, d)
            changed = dict(tensors)
            changed[key] = tensors[key].copy()
            changed[key].reshape(-1)[-1] = bad
            save_file(changed, str(d / WTS))
            # (a lora_jax file's sha256 no longer matches: verify=False reads on to the values)
            kw = {"verify": False} if fmt == "lora_jax" else {}
            read = lj.load if fmt == "lora_jax" else lj.import_peft
            with pytest.raises(LoraFileError, match=re.escape(key)) as e:
                read(d, **kw)
            assert str(d / WTS) in str(e.value)
            read(d, check_finite=False, **kw)


# --------------------------------------------------------------------------- quantized base files

BASE_META = "lora_jax_base"
RECORD_VALUES = HOSTILE_VALUES + [
    "nf4",
    "int4",
    "int8",
    "nf8",
    "float32",
    "bfloat16",
    "int8",
    "uint8",
    "complex64",
    "object",
    "io",
    "oi",
    "sio",
    "s",
    "iox",
    "ii",
    32,
    64,
    128,
    3,
    [64, 8],
    [8, 64],
    [2, 64, 8],
    [64],
    [0, 8],
    [64, -8],
    [True, 8],
    [64.0, 8],
    [2**40, 2**40],
]


@pytest.fixture(scope="module")
def base_source(tmp_path_factory):
    """A base file with an NF4 + double quant, an int8 per-channel, an int4 blockwise and a
    stacked NF4 kernel, and a dense leaf; its metadata document and tensors."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {"a": w(64, 8), "b": w(32, 8), "c": w(64, 4), "s": w(2, 64, 8), "bias": w(8)}
    q = lj.quantize(params, "a", double_quant=True)
    q = lj.quantize(q, "b", scheme="int8", block_size=None)
    q = lj.quantize(q, "c", scheme="int4", block_size=32)
    q = lj.quantize(q, "s", layouts={"s": "sio"})
    path = lj.save_base(tmp_path_factory.mktemp("base") / "base.safetensors", q)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        doc = json.loads(f.metadata()[BASE_META])
    return doc, load_file(str(path))


def check_base(path: Path, leaf: str | None = None) -> str:
    """load_base reads ``path`` (every quantized leaf then dequantizes) or raises a
    LoraFileError naming the file (and ``leaf``, given); returns the outcome."""
    try:
        back = lj.load_base(path)
    except LoraFileError as e:
        assert str(path) in str(e), str(e)
        assert leaf is None or repr(leaf) in str(e), (leaf, str(e))
        return "LoraFileError"
    except Exception as e:  # noqa: BLE001 - any other outcome is the failure being tested
        raise AssertionError(f"load_base: {type(e).__name__}: {e}") from e
    for x in jax.tree.leaves(back, is_leaf=lambda x: isinstance(x, lj.QuantizedArray)):
        if isinstance(x, lj.QuantizedArray):
            assert lj.dequantize(x).shape == x.shape
    return "read"


def write_base(path: Path, tensors: dict, doc: Any) -> Path:
    from safetensors.numpy import save_file

    text = doc if isinstance(doc, str) else json.dumps(doc)
    save_file(tensors, str(path), metadata={BASE_META: text})
    return path


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("block_size", -64),
        ("block_size", 48),
        ("block_size", True),
        ("block_size", None),
        ("dtype", "int8"),
        ("dtype", "no such dtype"),
        ("shape", []),
        ("shape", [64, 0]),
        ("axes", "ix"),
        ("axes", "ss"),
        ("scheme", "nf8"),
        ("double_quant", "yes"),
    ],
)
def test_load_base_refuses_each_malformed_record(base_source, tmp_path, field, value):
    doc, tensors = base_source
    bad = json.loads(json.dumps(doc))
    bad["quantized"]["a"][field] = value
    path = write_base(tmp_path / "bad.safetensors", tensors, bad)
    with pytest.raises(
        LoraFileError,
        match=rf"{re.escape(str(path))}: quantization record of "
        r"leaf 'a' is invalid",
    ):
        lj.load_base(path)
    for missing in ("dtype", "shape", "axes", "scheme", "block_size"):
        gone = json.loads(json.dumps(doc))
        del gone["quantized"]["a"][missing]
        path = write_base(tmp_path / f"gone-{missing}.safetensors", tensors, gone)
        with pytest.raises(LoraFileError, match="leaf 'a' is invalid"):
            lj.load_base(path)


@FAST
@given(data=st.data())
def test_load_base_metadata_fuzz(base_source, tmp_path, data):
    """Records mutated field by field (hostile and plausible values, removals, unknown
    fields), whole records and the document replaced: a read or a LoraFileError."""
    doc, tensors = base_source
    bad = json.loads(json.dumps(doc))
    leaf = data.draw(st.sampled_from(sorted(bad["quantized"])))
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["set", "delete", "record", "extra", "top"]))
        records = bad.get("quantized")
        rec = records.get(leaf) if isinstance(records, dict) else None
        if action in ("set", "delete") and isinstance(rec, dict) and rec:
            field = data.draw(st.sampled_from(sorted(rec)))
            if action == "delete":
                del rec[field]
            else:
                rec[field] = data.draw(st.sampled_from(RECORD_VALUES))
        elif action == "record" and isinstance(records, dict):
            records[leaf] = data.draw(st.sampled_from(RECORD_VALUES))
        elif action == "extra" and isinstance(rec, dict):
            rec[data.draw(st.sampled_from(["extra", "", "shape "]))] = data.draw(
                st.sampled_from(RECORD_VALUES)
            )
        elif action == "top":
            key = data.draw(st.sampled_from(["format_version", "quantized", "other"]))
            bad[key] = data.draw(st.sampled_from(RECORD_VALUES))
    outcome = check_base(write_base(tmp_path / "fuzz.safetensors", tensors, bad))
    STATS["load_base"][outcome] += 1
    STATS["load_base"]["cases"] += 1


# --------------------------------------------------------------------------- the command line


def cli_cases(sources, fmt: str, tmp_path: Path) -> list[tuple[str, Path]]:
    """Mutated directories of every kind above, for the command line."""
    src = sources[fmt][0]
    raw_w, raw_c = (src / WTS).read_bytes(), (src / CFG).read_bytes()
    doc = json.loads(raw_c)
    bodies = [(f"truncated weights at {c}", WTS, raw_w[:c]) for c in regions(raw_w, WTS)[::3]]
    bodies += [(f"truncated config at {c}", CFG, raw_c[:c]) for c in regions(raw_c, CFG)[::6]]
    bodies += [(k, WTS, b) for k, b in {**header_lies(raw_w), **extra_tensors(raw_w)}.items()]
    bodies += [
        (f"json {'/'.join(map(str, p))}={v!r}"[:80], CFG, json.dumps(replaced(doc, p, v)).encode())
        for i, p in enumerate(json_paths(doc))
        for v in (HOSTILE_VALUES[i % len(HOSTILE_VALUES)],)
    ]
    return [(kind, mutated(sources, fmt, tmp_path, name, body)) for kind, name, body in bodies]


def base_file(params: Any, path: Path) -> Path:
    from safetensors.numpy import save_file

    leaves, _ = lj.advanced.leaves_with_paths(params)
    save_file({p: np.asarray(x) for p, x in leaves}, str(path))
    return path


def check_cli(argv: list[str], out: Path, capsys) -> int:
    """``lora-jax ARGV``: exit 0, or exit 1 with one line on stderr and nothing at ``out``."""
    from lora_jax._cli import main

    code = main(argv)
    _, err = capsys.readouterr()
    if code != 0:
        assert code == 1, (argv, code, err)
        assert err.count("\n") == 1 and err.startswith("lora-jax: error: "), (argv, err)
        assert "Traceback" not in err and not out.exists(), (argv, err)
    shutil.rmtree(out, ignore_errors=True)
    out.unlink(missing_ok=True)
    return code


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_on_hostile_directories(sources, fmt, tmp_path, capsys):
    base = base_file(sources[fmt][1], tmp_path / "base.safetensors")
    out = tmp_path / "out"
    other = "peft" if fmt == "lora_jax" else "lora_jax"
    codes = collections.Counter()
    for kind, d in cli_cases(sources, fmt, tmp_path):
        for argv in (
            ["inspect", *(["--json"] if len(kind) % 2 else []), str(d)],
            ["merge", "--base", str(base), "--adapter", str(d), "--out", str(out), "--no-progress"],
            ["convert", "--to", other, str(d), str(out), "--base", str(base)],
        ):
            codes[check_cli(argv, out, capsys)] += 1
    STATS[f"cli {fmt}"].update({f"exit {k}": v for k, v in codes.items()})
    STATS[f"cli {fmt}"]["cases"] += sum(codes.values())
    assert codes[1] > 0


def test_cli_process_prints_one_line_and_no_traceback(sources, tmp_path):
    import subprocess
    import sys

    raw = (sources["peft"][0] / WTS).read_bytes()
    d = mutated(sources, "peft", tmp_path, WTS, raw[: len(raw) // 2])
    base = base_file(sources["peft"][1], tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_jax._cli",
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(d),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(d / WTS) in proc.stderr and not out.exists()


def test_lying_headers_do_not_grow_the_process(sources, tmp_path):
    """The whole process's peak RSS (XLA and Rust allocations included, which tracemalloc does
    not see) grows by less than 64 MiB over every lying header of both formats."""
    import subprocess
    import sys

    dirs = []
    for fmt in ("lora_jax", "peft"):
        raw = (sources[fmt][0] / WTS).read_bytes()
        dirs += [
            (fmt, str(mutated(sources, fmt, tmp_path, WTS, body)))
            for body in header_lies(raw).values()
        ]
    script = f"""
import resource, lora_jax as lj
lj.load  # imported: JAX and safetensors are in the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for fmt, d in {dirs!r}:
    try:
        lj.load(d) if fmt == "lora_jax" else lj.import_peft(d)
    except lj.LoraFileError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr
    grown_kib = int(r.stdout.split()[-1])
    STATS["process"]["lying-header cases"] = len(dirs)
    STATS["process"]["peak RSS growth KiB"] = grown_kib
    assert grown_kib < 64 * 1024, grown_kib


# --------------------------------------------------------------------------- no code runs


def test_no_pickle_anywhere_in_lora_jax():
    """No module of lora_jax imports a deserialiser that can run code, or calls eval/exec."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    hits = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in banned_modules for n in names):
                hits.append(f"{path.name}:{node.lineno}: imports {names}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("eval", "exec", "__import__")
            ):
                hits.append(f"{path.name}:{node.lineno}: calls {node.func.id}")
        if re.search(r"torch\.load|allow_pickle\s*=\s*True|weights_only\s*=\s*False", text):
            hits.append(f"{path.name}: torch.load / allow_pickle")
    assert hits == [], hits


def test_a_pickled_peft_adapter_is_refused_unread(sources, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(sources["peft"][0] / CFG, d / CFG)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04crunning code\n")
    with pytest.raises(LoraFileError, match="adapter_model.bin: a pickled PyTorch adapter"):
        lj.import_peft(d)


# --------------------------------------------------------------------------- the report


def test_zz_report(capsys):
    """Prints the figures (run with -s to see them) and checks every format met many cases."""
    lines = [f"{fmt}: {dict(c)}" for fmt, c in sorted(STATS.items())]
    lines.append(f"worst-case tracemalloc peak: {PEAK}")
    lines.append(
        f"most work in one read: {WORK} (bounds {READ_FACTOR} x file bytes + "
        f"{READ_SLACK} B, {MAX_COMPILES} compilations)"
    )
    with capsys.disabled():
        print("\nhostile files:\n  " + "\n  ".join(lines))
    if STATS:  # empty when this test runs alone
        assert all(c["cases"] >= 100 for f, c in STATS.items() if f != "process"), STATS
        assert all(c["LoraFileError"] > 0 for f, c in STATS.items() if f in FORMATS), STATS
