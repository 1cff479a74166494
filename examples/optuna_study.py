"""Your own Optuna study of a flow, with flowdiag pruning the trials whose flow goes unstable.

Run time here (one CPU core): 10 s idle, about 20 s with other work running (6 trials of up to 150
steps); --tiny about 7 s, most of it imports and the study's creation (2 trials of 12 steps: the test
suite runs this).

    python examples/optuna_study.py
    flowdiag report runs/optuna-study       # every trial's run file
    flowdiag watch runs/optuna-study        # while it runs

A y0ast-style Glow on the 8x8 digits at batch 1, its last level at 1x1: there each ActNorm's own
first-batch init sees one value per channel, and its scale becomes 1/(0 + 1e-6). The study searches M
(1 = that init; 16 = Algorithm 1 over 16 minibatches) and the learning rate. Two lines do it:

    study = optuna.create_study(pruner=StabilityPruner(max_abs=1e4, wrapped=optuna.pruners.MedianPruner()))
    with flowdiag.Monitor(model, run_dir, trial=trial) as monitor: ...   # + trial.should_prune()

The Monitor keeps each trial's run file, status, NaN onset and peak |output| as trial user attributes
(the names `flowdiag ablate` uses); the pruner stops a trial once it saw a non-finite value or an output
over 1e4, and leaves the rest to MedianPruner, which compares the bpd each trial reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import torch

import flowdiag
from flowdiag.bench.threaded_glow import ThreadedGlow
from flowdiag.glow.model import dequantize
from flowdiag.integrations.optuna import StabilityPruner
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import load_dataset


def objective(trial: optuna.Trial, out: Path, steps: int, seed: int = 0) -> float:
    """Train one Glow at batch 1 under a Monitor tied to the trial; the mean bpd of the last 10 steps."""
    init_batches = trial.suggest_categorical("init_batches", [1, 16])
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    torch.manual_seed(seed)
    model = ThreadedGlow(channels=1, levels=3, steps=2, hidden=16, noise=False)
    images = load_dataset(DataConfig()).train
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    batches = [dequantize(images[i : i + 1]) for i in order[: steps + init_batches].tolist()]
    if init_batches > 1:
        flowdiag.cumulative_init(model, batches[steps:])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    settings = {"train": {"init_batches": init_batches, "batch_size": 1, "lr": lr, "seed": seed}}
    bpds: list[float] = []
    with flowdiag.Monitor(model, out / f"trial-{trial.number}", config=settings, trial=trial) as monitor:
        for step, x in enumerate(batches[:steps], start=1):
            optimizer.zero_grad()
            loss = model(x)[1].mean()  # bits per dimension
            loss.backward()
            monitor.step(loss, bpd=loss)
            bpds.append(float(loss.detach()))
            trial.report(sum(bpds[-10:]) / len(bpds[-10:]), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
            optimizer.step()
    return sum(bpds[-10:]) / len(bpds[-10:])


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 trials of 12 steps")
    parser.add_argument("--out", type=Path, default=Path("runs/optuna-study"))
    args = parser.parse_args(argv)
    grid = {"init_batches": [1, 16], "lr": [1e-3] if args.tiny else [3e-4, 1e-3, 3e-3]}
    args.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{args.out / 'study.db'}",  # Optuna Dashboard reads it too
        sampler=optuna.samplers.GridSampler(grid, seed=0),
        pruner=StabilityPruner(max_abs=1e4, wrapped=optuna.pruners.MedianPruner(n_warmup_steps=50)),
    )
    steps = 12 if args.tiny else 150
    study.optimize(lambda trial: objective(trial, args.out, steps), n_trials=len(grid["lr"]) * 2)
    for trial in study.get_trials():
        attrs = trial.user_attrs
        where = f" at step {attrs['steps']}, peak |output| {attrs.get('peak_max_abs', float('nan')):.3g}"
        print(f"trial {trial.number} {trial.params}: {trial.state.name.lower()} ({attrs['status']}{where})")
    print(f"report: flowdiag report {args.out}")
    return study


if __name__ == "__main__":
    main()
