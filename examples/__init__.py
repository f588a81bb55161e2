"""The recipes (``python -m examples.<recipe>`` from the repository root); see README.md."""
