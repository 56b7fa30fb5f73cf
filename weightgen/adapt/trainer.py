"""Train one task with Lightning: a thin LightningModule over the plain model.

The protocol (issue 7): AdamW (lr 2e-3, weight decay 1e-6) on the trainable parameters only,
StepLR x0.1 at 1/3 and 2/3 of the steps, gradient clipping at 1.0; the state kept is the one with
the best accuracy on a validation split carved from the training data (never the test split).
Training is deterministic in ``seed`` and leaves the caller's global RNG as it was.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..io import WeightgenError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    accelerator: str = "cpu"  # passed to pl.Trainer, as are devices
    devices: int | str = 1
    progress: bool = False
    logdir: str | None = None  # TensorBoard: <logdir>/<run_name>/<version>/
    max_steps: int | None = None  # caps the steps (benchmarks' quick mode); None: whole epochs

    def validate(self) -> None:
        if self.epochs < 1:
            raise WeightgenError("epochs must be >= 1", cli="--epochs must be >= 1")
        if self.batch_size < 1:
            raise WeightgenError("batch_size must be >= 1", cli="--batch-size must be >= 1")
        if not self.lr > 0:
            raise WeightgenError("lr must be > 0", cli="--lr must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: the trainable parameters and every buffer (BN statistics)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return state


@torch.no_grad()
def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, value in state.items():
        tensors[key].copy_(value)


class LitTask(pl.LightningModule):
    """Cross-entropy on one task; logs ``train/loss``, ``val/loss``, ``val/acc``; keeps the best-val state."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.best_acc = -1.0
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self._val_correct = 0
        self._val_seen = 0
        self._val_loss = 0.0
        self.step_seconds = 0.0  # forward + backward + optimizer step only (no validation, no loading)
        self._step_start = 0.0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_seconds += time.perf_counter() - self._step_start

    def on_validation_epoch_start(self):
        self._val_correct, self._val_seen, self._val_loss = 0, 0, 0.0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self._val_loss += F.cross_entropy(logits, y, reduction="sum").item()
        self._val_correct += (logits.argmax(1) == y).sum().item()
        self._val_seen += len(y)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._val_seen:
            return
        acc, loss = self._val_correct / self._val_seen, self._val_loss / self._val_seen
        self.log_dict({"val/acc": acc, "val/loss": loss}, prog_bar=True)
        self.history.append({"epoch": self.current_epoch, "step": self.global_step, "val_acc": acc, "val_loss": loss})
        if acc > self.best_acc:  # first best wins on ties: fewer steps, same accuracy
            self.best_acc, self.best_epoch = acc, self.current_epoch
            self.best_state = trainable_state(self.model)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        # x0.1 at 1/3 and 2/3 of training, stepped per optimizer step
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, math.ceil(self.total_steps / 3)), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


Data = "tuple[torch.Tensor, torch.Tensor] | DataLoader"


def as_loader(data, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """``data`` itself when it is a DataLoader (streamed from disk), else one over (inputs, labels)."""
    if isinstance(data, DataLoader):
        return data
    return make_loader(*data, batch_size, shuffle, seed)


def train_task(model: nn.Module, train: Data, val: Data, config: TrainConfig, seed: int = 0,
               run_name: str = "adapt", version: str | None = None) -> dict:
    """Train ``model``'s trainable parameters on ``train``; ends holding the best-``val`` state.

    ``train``/``val`` are model-ready (inputs, labels) tensors, or DataLoaders that yield such
    batches (a training loader brings its own shuffling and seed). Returns a summary: best val accuracy and
    epoch, steps, train seconds, seconds per step, per-epoch history. ``model`` stays on the device
    Lightning trained it on. The global RNG is forked: the caller's random state is unchanged.
    """
    config.validate()
    if not any(p.requires_grad for p in model.parameters()):
        raise WeightgenError("nothing to train: the model has no trainable parameters")
    train_loader = as_loader(train, config.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, max(config.batch_size, 256), shuffle=False)
    steps = config.epochs * len(train_loader)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    module = LitTask(model, config, steps)
    logger = False
    if config.logdir:
        from pytorch_lightning.loggers import TensorBoardLogger
        logger = TensorBoardLogger(str(config.logdir), name=run_name, version=version, default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=config.epochs, max_steps=steps, accelerator=config.accelerator, devices=config.devices,
        gradient_clip_val=config.grad_clip, logger=logger, enable_checkpointing=False,
        enable_progress_bar=config.progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(train_loader))),
        # one validation at the end of every epoch, and at the end of a step-capped run
        val_check_interval=min(len(train_loader), steps) if steps < len(train_loader) else 1.0,
    )
    model.train()  # Lightning keeps each submodule's mode; BatchNorm must update its statistics
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_cuda_devices(config)), warnings.catch_warnings():
        torch.manual_seed(seed)  # dropout / drop-path draw from the global RNG, forked here
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            trainer.fit(module, train_loader, val_loader)
        except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its shutdown
            raise KeyboardInterrupt from None
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt
    if module.best_state is None:
        raise WeightgenError("training ended before any validation; raise epochs",
                             cli="training ended before any validation; raise --epochs")
    restore_state(model, module.best_state)
    model.eval()
    return {"val_acc": module.best_acc, "best_epoch": module.best_epoch, "steps": trainer.global_step,
            "train_seconds": seconds, "seconds_per_step": module.step_seconds / max(1, trainer.global_step),
            "history": module.history}


def _cuda_devices(config: TrainConfig) -> list[int]:
    if config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available()):
        return list(range(torch.cuda.device_count()))
    return []


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batch by batch on the model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).sum().item() / len(labels)
