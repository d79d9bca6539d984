"""Data-parallel training on the CPU (gloo, two processes): BatchNorm running statistics the
same on every rank and in the checkpoint (TrainConfig.sync_batchnorm), and validation
metrics computed over the whole validation set and the same on every rank
(edgediag/engine/trainer.py)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from edgediag.engine.checkpoint import load_checkpoint
from edgediag.engine.model import DiagnosisModel
from edgediag.engine.trainer import TrainConfig, Trainer, to_plain_batchnorm, to_sync_batchnorm

N_TRAIN, N_VAL = 128, 40


@dataclasses.dataclass
class _Config:
    hidden: int = 16


class _BNNet(DiagnosisModel):
    """Linear -> BatchNorm1d -> ReLU -> Linear; not registered (the trainer needs no registry).
    Its validation metric is the mean negative cross-entropy over the items it was given (a
    continuous number, different on any subset) and it reports how many items that was."""

    Config = _Config
    data_kind = "toy"
    primary_metric = "neg_loss"

    def __init__(self, config):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(8, config.hidden), nn.BatchNorm1d(config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, 2))

    def training_step(self, batch, phase="main"):
        return {"loss": F.cross_entropy(self.net(batch["x"]), batch["y"])}

    def score(self, x):
        return self.net(x).softmax(-1)[:, 1]

    @torch.no_grad()
    def evaluate(self, loader, out_dir=None):
        total, n = 0.0, 0
        for batch in loader:
            total += float(F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="sum"))
            n += len(batch["y"])
        return {"neg_loss": -total / n, "n": n}

    def example_input(self, batch_size=1):
        return torch.zeros(batch_size, 8)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        # Shifted and scaled so the BatchNorm statistics are far from their initial 0 and 1.
        self.x = 3 * torch.randn(n, 8, generator=g) + 2 + self.y[:, None] * 1.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(self.y[i])}


def _running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train, val = _Items(N_TRAIN, 1), _Items(N_VAL, 2)
    results = {}
    for sync in (True, False):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=16, device="cpu", threads=1, warmup=0.0, amp=False,
                          sync_batchnorm=sync)
        trainer = Trainer(_BNNet(_Config()), cfg, os.path.join(out, f"sync_{sync}"), progress=False)
        model = trainer.fit(train, val)
        results[sync] = {"history": trainer.history, "stats": _running_stats(model),
                         "norm_types": sorted({type(m).__name__ for m in model.modules()
                                               if isinstance(m, nn.modules.batchnorm._BatchNorm)})}
        dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both trainings (sync_batchnorm on, then off) in one pair of gloo processes."""
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


def test_batchnorm_statistics_synchronised_across_ranks_and_checkpointed(two_ranks):
    out, (r0, r1) = two_ranks
    a, b = r0[True]["stats"], r1[True]["stats"]
    assert a.keys() == {"net.1.running_mean", "net.1.running_var"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs between ranks")
    # The checkpoint holds those statistics, in plain BatchNorm that loads into a model without DDP.
    assert r0[True]["norm_types"] == r1[True]["norm_types"] == ["BatchNorm1d"]
    payload = load_checkpoint(out / "sync_True" / "last.pt")
    for key in a:
        torch.testing.assert_close(payload["state_dict"][key], a[key], rtol=0, atol=0)
    _BNNet(_Config()).load_state_dict(payload["state_dict"])
    # Trained statistics, not the initial ones.
    assert a["net.1.running_mean"].abs().mean() > 0.1


def test_without_sync_batchnorm_the_ranks_statistics_differ(two_ranks):
    """train.sync_batchnorm=false: plain DDP, whose buffers follow rank 0 but take each
    rank's own last batch, so the ranks end with different running statistics."""
    _, (r0, r1) = two_ranks
    a, b = r0[False]["stats"], r1[False]["stats"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sync", [True, False])
def test_validation_metrics_same_on_every_rank_and_over_the_whole_set(two_ranks, sync):
    out, (r0, r1) = two_ranks
    h0, h1 = r0[sync]["history"], r1[sync]["history"]
    assert len(h0) == len(h1) == 2
    for e0, e1 in zip(h0, h1):
        assert e0["val_n"] == e1["val_n"] == N_VAL  # every validation item, on every rank
        assert e0["val_neg_loss"] == e1["val_neg_loss"]
        assert e0["loss"] == e1["loss"]  # the logged training loss is the mean over ranks
    # The recorded metric is the one the saved model gets on the whole validation set.
    model = _BNNet(_Config())
    model.load_state_dict(load_checkpoint(out / f"sync_{sync}" / "last.pt")["state_dict"])
    model.eval()
    loader = torch.utils.data.DataLoader(_Items(N_VAL, 2), batch_size=16)
    expected = model.evaluate(loader)["neg_loss"]
    assert h0[-1]["val_neg_loss"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_sync_batchnorm_swap_round_trip():
    """The CUDA path's swap: SyncBatchNorm in place while training, the original modules
    (same parameters, current buffers) back afterwards."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    originals = [model[1], model[2][0]]
    weight = model[1].weight
    swaps = to_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    assert model[1].weight is weight
    model[1].running_mean = torch.full((4,), 3.0)  # a buffer replaced while swapped still comes back
    keys = set(model.state_dict())
    to_plain_batchnorm(swaps)
    assert [model[1], model[2][0]] == originals
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))
    assert set(model.state_dict()) == keys
