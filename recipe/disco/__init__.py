"""DisCO (Discriminative Constrained Optimization) for verl 0.9.1.

Data path: data -> reward -> estimator -> loss (objective) -> main_disco (trainer) -> scripts -> evaluate.
"""
