"""The experiment trackers rank 0 feeds (``train.loggers``): TensorBoard, Weights & Biases, MLflow (DESIGN §11).

Each tracker gets the resolved config once, every record's numbers (sections ``train/`` for steps, ``val/`` for
validations, ``run/`` for the rest, at the record's step) and the final eval (``final/``). The trackers' own
clients are called from rank 0 of the training workers, so ``tailkd distill`` and every Tune trial log alike:

- W&B: offline under ``OUT/wandb`` unless ``WANDB_MODE`` says otherwise (``wandb sync OUT/wandb/offline-run-*``
  uploads later); project ``WANDB_PROJECT`` or ``tailkd``; group ``train.run_name``; run name: the output
  directory's (a search's trials share the group, each its own run).
- MLflow: ``MLFLOW_TRACKING_URI``, else a local file store ``OUT/mlruns`` (no server); experiment
  ``train.run_name``; run name: the output directory's; the config as params and as ``config.json``.

A relaunch that resumes from a checkpoint starts a new tracker run (the same name) from the resumed step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

Numbers = dict[str, float]


class TensorBoardTracker:
    def __init__(self, out_dir: Path, config: dict):
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```")

    def log(self, numbers: Numbers, step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_final(self, numbers: Numbers, step: int) -> None:
        self.log(numbers, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: Path, config: dict):
        import wandb  # deferred: an optional extra, imported only when configured

        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out_dir),
                              project=os.environ.get("WANDB_PROJECT", "tailkd"), group=config["train"]["run_name"],
                              name=out_dir.name, config=config, settings=wandb.Settings(silent=True))

    def log(self, numbers: Numbers, step: int) -> None:
        self.run.log(numbers, step=step)

    def log_final(self, numbers: Numbers, step: int) -> None:
        self.run.summary.update(numbers)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out_dir: Path, config: dict):
        # deferred: an optional extra, imported only when configured. MLflow 3 keeps its file store only on request.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").as_uri())
        name = config["train"]["run_name"]
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        params = [Param(key, json.dumps(value)) for key, value in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, numbers: Numbers, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(key, value, now, step) for key, value in numbers.items()])

    def log_final(self, numbers: Numbers, step: int) -> None:
        self.log(numbers, step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
