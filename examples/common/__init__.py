"""What the recipes, the study and the benchmarks share: the LM, its pretrained base, text, generation."""
