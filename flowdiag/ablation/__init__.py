"""Ablations and λ tuning on Optuna: grids of M × λ × batch size × seed (and any trainer option)."""
