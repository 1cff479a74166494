"""The paper's two stabilizers for any supported flow: the cumulative init (Algorithm 1) and the
log-det penalty (eq. 2), and the audit that says, before training, which ActNorm inits would fail."""
