"""Training: train.py's options and configuration, and the loop with the pieces it calls.

- options.py: the one table of train.py's options (and the recipes: the defaults of options left unset);
- config.py: options -> a run's configuration, as pure functions; what a resume may not change;
- loop.py: `training_loop`, read top to bottom (set up, resume, loop: report, snapshot, stop, step, EMA);
- setup.py: the network with its seeded initial weights, DDP and torch.compile, precision, leftovers;
- data.py: the data order (`GlobalBatchSampler`) and the reference batch;
- step.py: one optimizer step (the loss's draws, accumulation, learning rate, Adam);
- ema.py: the classic and power-function EMAs; report.py and stats.py: the statistics of a tick;
- snapshot.py: network snapshots, sample grids, metrics; stop.py: stopping on a signal.

The training-state format is `training.checkpoint.state`'s.
"""

from training.train.config import complete, training_config
from training.train.loop import training_loop

__all__ = ["complete", "training_config", "training_loop"]
