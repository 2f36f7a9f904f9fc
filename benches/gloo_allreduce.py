"""PyTorch Gloo all-reduce on loopback: the baseline of benches/collective.rs (same sizes, iterations, rounds).

Spawns `--world` ranks with torch.multiprocessing, init_method tcp on 127.0.0.1, one intra-op thread each, and
times `torch.distributed.all_reduce` (sum, float32, CPU) per round after warm-up. Prints one line per rank,
size and round: "@@gloo <rank> <bytes> <iters> <seconds>".
"""

import argparse
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, sizes, iters, rounds, warmup, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for size, it in zip(sizes, iters):
        t = torch.full((size // 4,), 1e-3, dtype=torch.float32)
        for _ in range(warmup):
            dist.all_reduce(t)
        for r in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(it):
                dist.all_reduce(t)
            queue.put((rank, size, it, time.perf_counter() - t0))
        del t
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--sizes", required=True, help="bytes, comma-separated")
    p.add_argument("--iters", required=True, help="iterations per round for each size, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    iters = [int(x) for x in a.iters.split(",")]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(
        worker,
        args=(a.world, free_port(), sizes, iters, a.rounds, a.warmup, queue),
        nprocs=a.world,
        join=True,
    )
    while not queue.empty():
        rank, size, it, secs = queue.get()
        print(f"@@gloo {rank} {size} {it} {secs:.6f}", flush=True)


if __name__ == "__main__":
    main()
