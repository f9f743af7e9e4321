"""fxquant across processes: a binary MLP on scikit-learn's digits with DDP or FSDP2.

    torchrun --nproc_per_node=2 examples/distributed.py [--fsdp] [--epochs 20] [--out FILE]

Every rank prepares the same model (same seed), wraps it (DistributedDataParallel, or FSDP2
``fully_shard`` with ``--fsdp``) and trains on its share of each global batch: NCCL when CUDA
gives every rank of the machine its own GPU, else gloo on CPU. Then every rank calls
``fxquant.convert`` and ``fxquant.save`` (FSDP2 gathers the shards there, a collective; only
rank 0 writes), and rank 0 loads the file into a fresh float model in a single process and
prints its test accuracy.

Run without torchrun it trains in one process (a process group of one). 13 s (DDP) and 23 s
(FSDP2) for 20 epochs on 2 busy CPU cores; ``--steps N`` stops after N optimizer steps.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_data import load_digits, split  # noqa: E402
from quickstart import accuracy, make_model  # noqa: E402  (the quick start's model)

import fxquant  # noqa: E402


def _join_process_group() -> bool:
    """Join torchrun's process group (or a group of one without torchrun); True if we made it."""
    if dist.is_initialized():  # the caller made one (the tests do)
        return False
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # NCCL needs a GPU per rank
    backend = "nccl" if torch.cuda.device_count() >= ranks_here > 0 else "gloo"
    if "RANK" in os.environ:  # started by torchrun: MASTER_ADDR/PORT, RANK, WORLD_SIZE are set
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    return True


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch", type=int, default=100, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "distributed_bnn.fxq"))
    args = parser.parse_args(argv)

    made_group = _join_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)

    x, y = load_digits()
    x_train, y_train, x_test, y_test = split(x * 2 - 1, y)  # inputs in [-1, 1]
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn()).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(prepared)  # the same object: its parameters are now shards
    else:
        model = nn.parallel.DistributedDataParallel(prepared)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # after fully_shard: over the shards
    fxquant.training.LatentWeightClip(prepared, opt)  # binary latents stay in [-1, 1]

    steps = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(args.batch):  # the same global batches on every rank
            mine = batch[rank::world].to(device)  # this rank's share
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[mine]), y_train[mine])
            loss.backward()
            opt.step()
            steps += 1
            if args.steps is not None and steps >= args.steps:
                break
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f} (rank 0's share)", flush=True)
        if args.steps is not None and steps >= args.steps:
            break

    prepared_acc = accuracy(model, x_test, y_test)  # FSDP: every rank runs it (all-gathers)
    converted = fxquant.convert(model)  # every rank: FSDP2 gathers the shards here
    fxquant.save(converted, args.out)  # every rank may call it; rank 0 writes
    dist.barrier()  # the file is complete before anyone reads it
    result = prepared_acc
    if rank == 0:
        loaded = fxquant.load(args.out, make_model()).to(device)  # one process, no group needed
        result = accuracy(loaded, x_test, y_test)
        mode = "FSDP2 fully_shard" if args.fsdp else "DDP"
        print(f"{mode} on {world} rank(s) ({dist.get_backend()}), {steps} steps: test accuracy "
              f"{100 * prepared_acc:.1f}% (prepared), saved to {args.out}")
        print(f"loaded in a single process: test accuracy {100 * result:.1f}%", flush=True)
    if made_group:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
