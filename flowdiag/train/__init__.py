"""flowdiag's Glow trainer: data, batches, the objective, the optimizer over one flat tensor, precision,
checkpoints, the replay of a divergence, progress and the sample grid."""
