"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    import jax
    import numpy as np

    params, merged, restored = namespace["params"], namespace["merged"], namespace["restored"]
    kernel = lambda t: np.asarray(t["params"]["fc1"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(merged), kernel(params))  # training moved the adapted weights
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isfinite(float(namespace["loss"]))


def test_readme_leads_with_the_two_commands():
    text = README.read_text()
    quick = text.index("## Quick start")
    assert text.index("make demo", quick) < text.index("make test", quick) < text.index("## The idea")
