"""Train one task with Lightning: a thin LightningModule over the plain model.

The protocol (issue 7): AdamW (lr 2e-3, weight decay 1e-6) on the trainable parameters only,
StepLR x0.1 at 1/3 and 2/3 of the steps, gradient clipping at 1.0; the state kept is the one with
the best accuracy on a validation split carved from the training data (never the test split).
Training is deterministic in ``seed`` and leaves the caller's global RNG as it was.

Several devices (``devices=2``, strategy ``ddp``): Lightning runs one process per device. The
training split is sharded by a seeded ``DistributedSampler``, each device taking ``batch_size / N``
of a batch (so as many steps of the same global batch as on one device); validation is sharded too and its
counts are summed over the ranks, so every rank sees the same accuracy and keeps the same epoch;
at the end rank 0's best state is broadcast, so the model holds it on every rank. With the ``ddp``
strategy Lightning re-runs the calling *script* once per extra device: a script that writes files
does so on rank 0 only (``summary["rank"]``, or ``pytorch_lightning.utilities.rank_zero_only.rank``
before training).
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..io import WeightgenError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64  # the global batch: on N devices each takes batch_size / N
    lr: float = 2e-3
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    accelerator: str = "cpu"  # passed to pl.Trainer, as are devices
    devices: int | str = 1
    progress: bool = False
    logdir: str | None = None  # TensorBoard: <logdir>/<run_name>/<version>/
    max_steps: int | None = None  # caps the steps (benchmarks' quick mode); None: whole epochs
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", "16-mixed" (CUDA only)
    channels_last: bool = False  # CNNs: model and inputs in channels_last memory format (faster convs)
    compile: bool = False  # torch.compile the model's forward (slow first steps, faster afterwards)
    strategy: str = "auto"  # Lightning strategy; several devices: "ddp" (one process per device)

    def validate(self) -> None:
        if self.epochs < 1:
            raise WeightgenError("epochs must be >= 1", cli="--epochs must be >= 1")
        if self.batch_size < 1:
            raise WeightgenError("batch_size must be >= 1", cli="--batch-size must be >= 1")
        if not self.lr > 0:
            raise WeightgenError("lr must be > 0", cli="--lr must be > 0")
        if isinstance(self.devices, int) and self.devices > 1 and self.batch_size % self.devices:
            raise WeightgenError(f"batch_size {self.batch_size} does not split evenly over {self.devices} devices",
                                 cli=f"--batch-size {self.batch_size} does not split evenly over --devices {self.devices}")
        if self.precision not in PRECISIONS:
            raise WeightgenError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                 cli=f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.precision == "16-mixed" and not _uses_cuda(self):
            # Lightning would quietly switch to bf16-mixed; say so instead
            raise WeightgenError("precision 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed",
                                 cli="--precision 16-mixed needs a CUDA GPU; on the CPU use --precision bf16-mixed")
        if self.strategy in SPAWN_STRATEGIES:
            raise WeightgenError(
                f"strategy {self.strategy} is not supported: its processes keep the best state to themselves; "
                "use ddp (Lightning runs the script once per device, rank 0 writes)",
                cli=f"--strategy {self.strategy} is not supported; use --strategy ddp (the script runs once per "
                    "device, rank 0 writes)")

    def to_dict(self) -> dict:
        return asdict(self)


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# launched by torch.multiprocessing: what a worker keeps (the best state, the history) never reaches the caller
SPAWN_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true",
                    "ddp_fork_find_unused_parameters_true", "ddp_notebook_find_unused_parameters_true")


def _uses_cuda(config: TrainConfig) -> bool:
    return config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())


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
    """Cross-entropy on one task; logs ``val/loss``, ``val/acc`` (and ``train/loss`` with a logdir); keeps the best-val state.

    Serves its own loaders (``train_dataloader``/``val_dataloader``) so that on several devices it
    can shard them knowing the rank: a seeded ``DistributedSampler`` for training (the batch order
    follows ``seed``), a padded one for validation whose padding is masked out of the counts.
    """

    def __init__(self, model: nn.Module, config: TrainConfig,
                 train_loader: DataLoader | None = None, val_loader: DataLoader | None = None, seed: int = 0):
        super().__init__()
        self.model = model
        self.config = config
        self.seed = seed
        self._loaders = {"train": train_loader, "val": val_loader}
        self._val_size = 0  # the validation split's size; samples past it (DistributedSampler padding) are masked
        self._val_batch_size = 0  # this rank's validation batch size
        self._forward = model  # torch.compile'd in configure_model when config.compile (not a submodule: same keys)
        self.best_acc = -1.0
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # correct, seen, summed loss
        self.step_seconds = 0.0  # forward + backward + optimizer step only (no validation, no loading)
        self._step_start = 0.0
        self.step_starts: list[float] = []  # perf_counter at each step's start: the loop's pace, loading included
        self.last_step_end = 0.0

    def forward(self, x):
        return self._forward(self._input(x))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def configure_model(self):
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.config.compile and self._forward is self.model:
            self._forward = torch.compile(self.model)

    def _loader(self, stage: str) -> DataLoader:
        loader = self._loaders[stage]
        if stage == "val":
            self._val_size = len(loader.dataset)
        world = self.trainer.world_size
        if world > 1:
            loader = shard_loader(loader, world, self.trainer.global_rank, train=stage == "train", seed=self.seed)
        if stage == "val":
            self._val_batch_size = loader.batch_size
        return loader

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.config.logdir:  # per-step logging costs ~5 ms a step in Lightning: only for TensorBoard's curve
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()
        self.step_starts.append(self._step_start)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_step_end = time.perf_counter()
        self.step_seconds += self.last_step_end - self._step_start

    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x).float()
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        world = self.trainer.world_size
        if world > 1:  # sample j of this rank is sample rank + j * world of the padded split
            local = batch_idx * self._val_batch_size + torch.arange(len(y), device=y.device)
            keep = self.trainer.global_rank + local * world < self._val_size
        loss = F.cross_entropy(logits[keep], y[keep], reduction="sum")  # 0 when nothing is kept
        sums = torch.stack([(logits.argmax(1) == y)[keep].sum().double(), keep.sum().double(), loss.double()])
        self._val_sums = self._val_sums.to(sums.device) + sums  # on the device: no sync per batch

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        # counts summed over the ranks: every rank gets the same accuracy, so keeps the same epoch
        sums = self.trainer.strategy.reduce(self._val_sums.to(self.device), reduce_op="sum").cpu()  # one sync
        correct, seen, loss_sum = sums.tolist()
        if not seen:
            return
        acc, loss = correct / seen, loss_sum / seen
        # already equal on every rank: sync_dist only keeps Lightning's epoch-level logging consistent
        self.log_dict({"val/acc": acc, "val/loss": loss}, prog_bar=True, sync_dist=True)
        self.history.append({"epoch": self.current_epoch, "step": self.global_step, "val_acc": acc, "val_loss": loss})
        if acc > self.best_acc:  # first best wins on ties: fewer steps, same accuracy
            self.best_acc, self.best_epoch = acc, self.current_epoch
            self.best_state = trainable_state(self.model)

    def on_fit_end(self):
        # buffers (BatchNorm statistics) may differ between ranks: everyone takes rank 0's best state
        if self.best_state is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for value in self.best_state.values():
                torch.distributed.broadcast(value, src=0)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        # x0.1 at 1/3 and 2/3 of training, stepped per optimizer step
        total = self.trainer.estimated_stepping_batches  # this rank's steps: the loader as sharded, max_steps
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, math.ceil(total / 3)), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def shard_loader(loader: DataLoader, world: int, rank: int, *, train: bool, seed: int = 0) -> DataLoader:
    """``loader`` over this rank's share of its dataset: shuffled by ``seed`` (and the epoch) when
    ``train``, in order otherwise; every rank gets as many batches (DistributedSampler pads).

    A training batch size is the global batch: each rank takes ``batch_size / world`` samples, so
    N devices take as many optimizer steps, of the same batch, as one device (the defaults hold).
    """
    if loader.batch_size is None:
        raise WeightgenError("a DataLoader with its own batch_sampler cannot be sharded over several devices")
    batch = loader.batch_size
    if train:
        if batch % world:
            raise WeightgenError(f"batch size {batch} does not split evenly over {world} devices",
                                 cli=f"--batch-size {batch} does not split evenly over {world} devices")
        batch //= world
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed)
    workers = loader.num_workers
    # worker seeds (augmentation) differ by rank; the shuffle itself comes from the sampler
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    return DataLoader(loader.dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=gen,
                      multiprocessing_context=loader.multiprocessing_context,
                      prefetch_factor=loader.prefetch_factor if workers else None,
                      persistent_workers=loader.persistent_workers and workers > 0)


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
    batches (a training loader brings its own shuffling and seed; on several devices its dataset is
    re-sharded by a ``DistributedSampler`` seeded by ``seed``). Returns a summary: best val accuracy
    and epoch, steps, train seconds, seconds per step, per-epoch history, and this process's
    ``rank`` (0 on one device; with DDP every rank returns the same accuracies and holds the same
    best state). ``model`` stays on the device Lightning trained it on, in the default memory
    format. The global RNG is forked: the caller's random state is unchanged.
    """
    config.validate()
    if not any(p.requires_grad for p in model.parameters()):
        raise WeightgenError("nothing to train: the model has no trainable parameters")
    train_loader = as_loader(train, config.batch_size, shuffle=True, seed=seed)
    val_loader = as_loader(val, max(config.batch_size, 256), shuffle=False)
    module = LitTask(model, config, train_loader, val_loader, seed=seed)
    logger = False
    if config.logdir:
        from pytorch_lightning.loggers import TensorBoardLogger
        logger = TensorBoardLogger(str(config.logdir), name=run_name, version=version, default_hp_metric=False)
    capped = config.max_steps is not None
    trainer = pl.Trainer(
        max_epochs=config.epochs, max_steps=config.max_steps if capped else -1,
        # a step cap shorter than an epoch ends that epoch early, so the run still ends with a validation
        **({"limit_train_batches": config.max_steps} if capped else {}),
        accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
        precision=config.precision, use_distributed_sampler=False,  # LitTask shards its own loaders
        gradient_clip_val=config.grad_clip, logger=logger, enable_checkpointing=False,
        enable_progress_bar=config.progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(train_loader))),
    )
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        # e.g. "auto" in a notebook picks ddp_notebook: its workers would keep the best state to themselves
        raise WeightgenError(f"Lightning chose {type(trainer.strategy).__name__} with a spawning launcher, whose processes "
                             "keep the best state to themselves; run several devices from a script (strategy ddp)")
    model.train()  # Lightning keeps each submodule's mode; BatchNorm must update its statistics
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(config)), warnings.catch_warnings():
            torch.manual_seed(seed)  # dropout / drop-path draw from the global RNG, forked here
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            try:
                trainer.fit(module)
            except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after its shutdown
                raise KeyboardInterrupt from None
    finally:
        if config.channels_last:  # task files (safetensors) need contiguous tensors
            model.to(memory_format=torch.contiguous_format)
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
            "history": module.history, "rank": trainer.global_rank, "world_size": trainer.world_size,
            # perf_counter at every step's start and the last step's end (benchmarks: the loop's own pace)
            "step_clock": {"starts": module.step_starts, "end": module.last_step_end}}


def _cuda_devices(config: TrainConfig) -> list[int]:
    return list(range(torch.cuda.device_count())) if _uses_cuda(config) else []


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batch by batch on the model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).sum().item() / len(labels)
