"""Benchmark: trl_rb.kl.token_kl against the research formula and against a floor, on CPU, float32 inputs [N, V].

- floor: ``torch.logsumexp(logits_p, -1)`` and ``torch.logsumexp(logits_q, -1)``: any exact KL must at least
  normalise both distributions, so this is the cost to beat (measured in the same run, same process).
- research: ``(softmax(p) * (log_softmax(p) - log_softmax(q))).sum(-1)`` on the whole tensor (trl_rb.kl.research_token_kl).
- token_kl: the chunked exact KL of trl_rb.

Time: median over repeats, the three methods interleaved round-robin in one process (so load from other processes
hits them alike). Memory: the peak resident memory beyond the inputs, in a fresh subprocess per method and size:
the inputs are created, the method runs once on two rows (so paging in code is not counted), the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``), the method runs once and
the extra is ``VmHWM - VmRSS(before)`` from /proc/self/status (torch's CPU allocator does not cache, so freed
temporaries leave RSS). For forward+backward the gradients, which are outputs the size of the inputs, are
subtracted as well. Cases that would not fit in the available memory are reported as "skipped (memory)".

Usage: python benchmarks/bench_kl.py [--quick] [--repeats R] [--threads T] [--sizes N,...] [--vocabs V,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_bench import _rss_kib, available_bytes, run_worker  # noqa: E402  (a sibling script, not a package)

METHODS = ("floor", "research", "token_kl")
MiB = 2**20
# Peak [N, V] float32 tensors each method holds beyond the inputs (for the "does it fit" check), forward / fwd+bwd.
# Measured with this script: research ~3.9 forward, ~4.8 with backward; token_kl < 0.1 and < 0.3.
_NEED_FWD = {"floor": 2, "research": 4.2, "token_kl": 0.2}
_NEED_BWD = {"research": 5.2, "token_kl": 0.5}
# Fraction of MemAvailable a case may plan to use (the machine is shared with other jobs).
_MEM_FRACTION = 0.75


def _inputs(n: int, v: int, requires_grad: bool = False):
    import torch

    gen = torch.Generator().manual_seed(0)
    logits_p = torch.randn(n, v, generator=gen).mul_(4.0)
    logits_q = torch.randn(n, v, generator=gen).add_(logits_p)
    return logits_p.requires_grad_(requires_grad), logits_q.requires_grad_(requires_grad)


def _method(name: str):
    import torch

    from trl_rb.kl import research_token_kl, token_kl

    if name == "floor":
        return lambda p, q: (torch.logsumexp(p, -1), torch.logsumexp(q, -1))
    return {"research": research_token_kl, "token_kl": token_kl}[name]


def _worker_memory(method: str, n: int, v: int, backward: bool) -> dict:
    """In a fresh process: extra peak RSS (bytes) of one call beyond the inputs (and the gradients)."""
    p, q = _inputs(n, v, requires_grad=backward)
    fn = _method(method)
    # Warm up on two rows first, so that paging in the kernels' code and one-off library buffers is not counted.
    warm = fn(p[:2].detach().requires_grad_(backward), q[:2].detach().requires_grad_(backward))
    if backward:
        warm.sum().backward()
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    out = fn(p, q)
    if backward:
        out.sum().backward()
    extra = (_rss_kib("VmHWM") - base) * 1024
    if backward:
        extra -= p.grad.nbytes + q.grad.nbytes
    return {"extra_bytes": extra}


def _worker_time(n: int, v: int, repeats: int, methods: list[str], backward_methods: list[str]) -> dict:
    """Median seconds per call of each method (interleaved), and of forward+backward."""

    p, q = _inputs(n, v)
    fns = {m: _method(m) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:  # warm-up
        fns[m](p, q)
    for _ in range(repeats):
        for m in methods:
            t = time.perf_counter()
            fns[m](p, q)
            times[m].append(time.perf_counter() - t)
    result = {m: statistics.median(ts) for m, ts in times.items()}
    p.requires_grad_(True)
    q.requires_grad_(True)
    for m in backward_methods:
        ts = []
        for _ in range(max(1, repeats // 2) + 1):
            p.grad = q.grad = None
            t = time.perf_counter()
            fns[m](p, q).sum().backward()
            ts.append(time.perf_counter() - t)
        result[m + "_fwd_bwd"] = statistics.median(ts[1:] if len(ts) > 1 else ts)
    return result


def _run_worker(args: list[str], threads: int) -> dict:
    return run_worker(__file__, args, threads)


def _fmt_ms(seconds: float | None) -> str:
    return "skipped (memory)" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_mb(nbytes: int | None) -> str:
    return "skipped (memory)" if nbytes is None else f"{nbytes / MiB:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def run(sizes: list[int], vocabs: list[int], repeats: int, threads: int) -> list[dict]:
    rows = []
    for v in vocabs:
        for n in sizes:
            nv = n * v * 4
            avail = available_bytes() * _MEM_FRACTION
            fits = {m: (2 + _NEED_FWD[m]) * nv < avail for m in METHODS}
            fits_bwd = {m: (4 + _NEED_BWD[m]) * nv < avail for m in _NEED_BWD}
            methods = [m for m in METHODS if fits[m]]
            backward_methods = [m for m in ("research", "token_kl") if fits_bwd[m]]
            print(f"N={n} V={v}: timing {methods} (fwd+bwd {backward_methods}) ...", file=sys.stderr, flush=True)
            timing = _run_worker(
                ["time", str(n), str(v), str(repeats), ",".join(methods), ",".join(backward_methods) or "-"], threads
            )
            if "error" in timing:
                print(f"  timing failed: {timing['error']}", file=sys.stderr)
                timing = {}
            row = {"N": n, "V": v, "time": {m: timing.get(m) for m in METHODS}, "mem": {}, "mem_bwd": {}}
            row["time_bwd"] = {m: timing.get(m + "_fwd_bwd") for m in ("research", "token_kl")}
            for m in METHODS:
                res = _run_worker(["memory", m, str(n), str(v), "0"], threads) if fits[m] else {}
                row["mem"][m] = res.get("extra_bytes")
            for m in ("research", "token_kl"):
                res = _run_worker(["memory", m, str(n), str(v), "1"], threads) if fits_bwd[m] else {}
                row["mem_bwd"][m] = res.get("extra_bytes")
            rows.append(row)
    return rows


def table(rows: list[dict], threads: int) -> str:
    lines = [
        f"float32 inputs [N, V], CPU, {threads} thread(s); time = median ms; extra = peak RSS beyond the inputs, MiB.",
        "",
        "| N | V | floor ms | token_kl ms | research ms | token_kl / floor | token_kl / research | floor extra | "
        "token_kl extra | research extra | token_kl fwd+bwd ms | research fwd+bwd ms | token_kl fwd+bwd extra* |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, m, tb, mb = r["time"], r["mem"], r["time_bwd"], r["mem_bwd"]
        lines.append(
            f"| {r['N']} | {r['V']} | {_fmt_ms(t['floor'])} | {_fmt_ms(t['token_kl'])} | {_fmt_ms(t['research'])} | "
            f"{_ratio(t['token_kl'], t['floor'])} | {_ratio(t['token_kl'], t['research'])} | {_fmt_mb(m['floor'])} | "
            f"{_fmt_mb(m['token_kl'])} | {_fmt_mb(m['research'])} | {_fmt_ms(tb['token_kl'])} | "
            f"{_fmt_ms(tb['research'])} | {_fmt_mb(mb['token_kl'])} |"
        )
    lines.append("")
    lines.append("\\* beyond the inputs and their gradients (the gradients are outputs the size of the inputs).")
    research_bwd = [
        f"N={r['N']} V={r['V']}: {_fmt_mb(r['mem_bwd']['research'])}" for r in rows if "research" in r["mem_bwd"]
    ]
    lines.append("Research formula fwd+bwd extra (MiB, same definition): " + "; ".join(research_bwd) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: N in {256, 1024}, V=50257, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7; 3 quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 256,1024,4096)")
    parser.add_argument("--vocabs", default=None, help="comma-separated V (default 50257,151936)")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        kind, *rest = args.worker
        if kind == "memory":
            method, n, v, backward = rest
            print(json.dumps(_worker_memory(method, int(n), int(v), backward == "1")))
        else:
            n, v, repeats, methods, backward_methods = rest
            bwd = [] if backward_methods == "-" else backward_methods.split(",")
            print(json.dumps(_worker_time(int(n), int(v), int(repeats), methods.split(","), bwd)))
        return 0

    sizes = [int(x) for x in (args.sizes or ("256,1024" if args.quick else "256,1024,4096")).split(",")]
    vocabs = [int(x) for x in (args.vocabs or ("50257" if args.quick else "50257,151936")).split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    rows = run(sizes, vocabs, repeats, args.threads)
    print(table(rows, args.threads))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
