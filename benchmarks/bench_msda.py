"""Multi-scale deformable attention: grid_sample reference vs the fast path, forward + backward.

Setting (encoder self-attention of a 512 x 512 image): levels 64², 32², 16², 8² (strides 8..64),
N=2 images, M=8 heads, D=32 channels per head, L=4 levels, P=4 points, Lq = all 5440 pixels.

Each implementation runs in its own subprocess so that its peak memory can be read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (torch's allocations are invisible to tracemalloc):
the peak is reported as the growth of the max RSS over the RSS after the inputs were created.
Times are the median of ``--repeats`` forward+backward passes after one warm-up pass.

    python benchmarks/bench_msda.py                # CPU, 2 threads (the project's reference machine)
    python benchmarks/bench_msda.py --threads 1 --repeats 7
    python benchmarks/bench_msda.py --device cuda  # peak = torch.cuda.max_memory_allocated

Measured on the project's 2-core CPU (quiet moment, torch 2.x): reference 248 / 628 ms (forward /
forward+backward, 540 MiB peak), fast 63 / 328 ms (202 MiB): 1.9x faster, 2.7x less memory; with
1 thread 1.65x. On a busy machine both slow down, the hand-written backward's many small ops more.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]
N, M, D, P = 2, 8, 32, 4


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def worker(impl: str, threads: int, repeats: int, device: str) -> dict:
    import torch

    from detr_lite.deformable.msda import ms_deform_attn, ms_deform_attn_reference

    torch.set_num_threads(threads)
    fn = {"reference": ms_deform_attn_reference, "fast": ms_deform_attn}[impl]
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    s = int(shapes.prod(1).sum())
    lq, n_levels = s, len(LEVELS)
    value = torch.randn(N, s, M, D, generator=g).to(device).requires_grad_()
    loc = (torch.rand(N, lq, M, n_levels, P, 2, generator=g) * 1.1 - 0.05).to(device).requires_grad_()
    attn = torch.rand(N, lq, M, n_levels, P, generator=g).softmax(-1).to(device).requires_grad_()
    grad = torch.randn(N, lq, M * D, generator=g).to(device)
    shapes = shapes.to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        out = fn(value, shapes, loc, attn)
        out.backward(grad)
        for t in (value, loc, attn):
            t.grad = None

    step()  # warm-up (allocator, lazy init)
    sync()
    base_rss = _rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    fwd, total = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn(value, shapes, loc, attn)
        sync()
        t1 = time.perf_counter()
        out.backward(grad)
        sync()
        t2 = time.perf_counter()
        for t in (value, loc, attn):
            t.grad = None
        del out
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    result = {
        "impl": impl,
        "fwd_s": statistics.median(fwd),
        "fwd_bwd_s": statistics.median(total),
        "peak_mib": peak_rss - base_rss,
    }
    if device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", choices=["reference", "fast"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.repeats, args.device)))
        return 0

    s = sum(h * w for h, w in LEVELS)
    print(
        f"MSDA fwd+bwd on {args.device} ({args.threads} threads): levels {LEVELS}, N={N} M={M} D={D} "
        f"L={len(LEVELS)} P={P}, Lq={s}; median of {args.repeats}"
    )
    results = {}
    for impl in ("reference", "fast"):
        cmd = [sys.executable, __file__, "--worker", impl, "--threads", str(args.threads)]
        cmd += ["--repeats", str(args.repeats), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[impl] = r
        print(
            f"  {impl:<9}  forward {r['fwd_s'] * 1e3:7.1f} ms   forward+backward {r['fwd_bwd_s'] * 1e3:7.1f} ms"
            f"   peak extra memory {r['peak_mib']:7.1f} MiB"
        )
    ref, fast = results["reference"], results["fast"]
    print(
        f"  speed-up (reference / fast): forward {ref['fwd_s'] / fast['fwd_s']:.2f}x, "
        f"forward+backward {ref['fwd_bwd_s'] / fast['fwd_bwd_s']:.2f}x; "
        f"memory {ref['peak_mib'] / max(fast['peak_mib'], 1e-9):.2f}x less"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
