"""DFT (discriminative fine-tuning, Guo et al. arXiv 2502.18679) for verl 0.9.1.

The objective is in :mod:`recipe.dft.objective` (plain PyTorch, no verl import).
"""
