"""LoRA vs adapters vs prefix tuning vs full fine-tuning on the demo's setting.

``python -m studies.lora_vs_adapters.study [--quick]`` (from the repository root):
``study.py`` runs it, ``baselines.py`` holds the adapter and prefix-tuning
baselines, ``tensor_parallel.py`` counts collectives in a sharded forward (its
own process), ``report.py`` writes the table and figures.
"""
