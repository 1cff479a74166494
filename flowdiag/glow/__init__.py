"""flowdiag's Glow (Kingma & Dhariwal 2018) as the paper uses it: the flow layers and the model. It
knows nothing of recording, stabilizing or training."""
