"""flowdiag inside the tools people train with: `lightning` (a Lightning callback, the optional extra
`flowdiag[lightning]`) and `optuna` (a pruner for a user's own study). Each is imported on its own:
`from flowdiag.integrations.lightning import FlowdiagCallback`. The live loggers (TensorBoard, MLflow,
W&B) need no module here: `flowdiag.Monitor(..., log_to=...)` takes their objects as they are.

This folder sits above train/ and below cli/; nothing below it imports it.
"""
