"""Benchmark: the per-token KL between two language models from last hidden states and LM heads ("LM-head KL").

All methods see the same random float32 inputs: policy hidden states ``hp`` [N, H] and head weight ``wp`` [V, H]
(both require grad), reference ``hq`` [N, H] and ``wq`` [V, H] (constants); no biases, temperature 1.

- trl_kernel: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, 1.0, ...)``
  (beta=1.0: KL(policy || reference)); it returns (divergence [N], entropy [N]); the backward is of
  ``divergence.sum()``. It works on [TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE] tiles of both models' logits (constants of
  that module: 4096 tokens x 32768 vocabulary columns), and its backward recomputes both models' tiles.
- linear_token_kl: ``trl_rb.kl.linear_token_kl(hp, wp, hq, wq)`` [N]; the backward is of ``.sum()``.
- linear_weighted_kl_sum: ``trl_rb.kl.linear_weighted_kl_sum(hp, wp, hq, wq, ones(N))``, a 0-d total. Its gradient
  is computed in the forward and its backward only scales the saved gradients, so its "fwd" and "fwd+bwd" times
  differ little (both are reported; its fwd is the cost of a training step's forward with grad enabled).
- floor: the matrix products alone, ``torch.mm`` on the same tiles as trl's kernel, into preallocated buffers.
  Forward: 2 products per tile (policy and reference logits). Forward+backward: those 2, then per tile 1 recompute
  of the policy product and the 2 gradient products ``grad_hidden[tile rows] += g @ W_tile`` and
  ``grad_W_tile += g.T @ h`` (g: the recomputed policy tile standing in for the logits' gradient), i.e. 5 products
  per tile and nothing else: the least work of any exact schedule that keeps no [N, V] logits and recomputes the
  policy's in the backward (trl's kernel recomputes both models', 6 products per tile). linear_weighted_kl_sum needs
  no recompute (4 products per tile), so its fwd+bwd / floor may be below 1.

Time: median over repeats, the methods interleaved round-robin in one process (so load from other processes hits
them alike), after one warm-up call of each (with --quick, a small one: two rows, 1024 vocabulary rows); the
forward is timed with grad enabled (as in training), without the backward. The values are checked in the same
process: max |trl_kernel - linear_token_kl| over the tokens (from the last timed forward calls).

Memory: the peak resident memory beyond the inputs, in a fresh subprocess per (method, case, fwd or fwd+bwd), as in
bench_kl.py: the inputs are created, the method runs once on two rows and the first 1024 vocabulary rows (so
paging in code is not counted), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), the method runs
once and the extra is ``VmHWM - VmRSS(before)`` from /proc/self/status (torch's CPU allocator does not cache, so
freed temporaries leave RSS). For forward+backward the gradients of hp and wp (outputs the size of the inputs; for
the floor its grad_hidden and grad_W buffers) are subtracted as well. The floor's buffers are allocated inside the
measured call, so they count. Cases that would not fit in the available memory (inputs, gradients and the largest
method's buffers against MemAvailable) are reported as "skipped (memory)".

Usage: python benchmarks/bench_head_kl.py [--quick] [--heads qwen0.5b,llama3] [--sizes N,...] [--repeats R]
       [--threads T] [--backward | --no-backward] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_bench import _rss_kib, available_bytes, run_worker  # noqa: E402  (a sibling script, not a package)

# The per-token KL alone, against trl's divergence kernel and the matmul floor.
KL_METHODS = ("trl_kernel", "linear_token_kl", "linear_weighted_kl_sum", "floor")
# The LM-head work of one policy-gradient loss step: trl's log-prob head alone (k1), with the rb term computed
# after it (linear_weighted_kl_sum), and fused into it (linear_logprob_kl); with their [N, H] x [H, V] products.
LOSS_METHODS = ("trl_logprob", "logprob+weighted_kl", "fused_logprob_kl")
LOSS_PRODUCTS = {"trl_logprob": 4, "logprob+weighted_kl": 8, "fused_logprob_kl": 6}
METHODS = KL_METHODS + LOSS_METHODS
# name -> (hidden size H, vocabulary size V) of the LM head.
HEADS = {"qwen0.5b": (896, 151936), "llama3": (2048, 128256)}
MiB = 2**20
# Fraction of MemAvailable a case may plan to use (the machine is shared with other jobs).
_MEM_FRACTION = 0.75
# linear_token_kl / linear_weighted_kl_sum hold at most five [chunk, V] float32 buffers (chunk <= 256 rows): with one
# more for temporaries, a generous bound.
_LINEAR_BUFFERS_PER_ROW = 6 * 4
# Vocabulary rows of the small warm-up call (memory workers always; timing in --quick).
_WARM_VOCAB = 1024

Inputs = tuple[Any, Any, Any, Any]  # hp, wp, hq, wq (torch tensors; torch is imported lazily)


def _inputs(n: int, h: int, v: int) -> Inputs:
    """Random policy/reference heads: logits with std ~3, the reference a perturbation of the policy."""
    import torch

    gen = torch.Generator().manual_seed(0)
    hp = torch.randn(n, h, generator=gen)
    wp = torch.randn(v, h, generator=gen).mul_(3.0 / h**0.5)
    hq = torch.randn(n, h, generator=gen).mul_(0.3).add_(hp)
    wq = torch.randn(v, h, generator=gen).mul_(1.0 / h**0.5).add_(wp)
    return hp.requires_grad_(True), wp.requires_grad_(True), hq, wq


class Floor:
    """The matrix products of trl's tiling alone, into preallocated buffers (see the module docstring)."""

    def __init__(self, hp, wp) -> None:
        import torch
        from trl.kernels.chunked_divergence import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE

        self.rows, self.cols = TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE
        n, v = hp.shape[0], wp.shape[0]
        self.s_buf = torch.empty(min(n, self.rows), self.cols)
        self.t_buf = torch.empty(min(n, self.rows), self.cols)
        self.grad_hidden = torch.empty(hp.shape)
        self.grad_weight = torch.empty(wp.shape)
        self.n, self.v = n, v

    def _tiles(self):
        for t0 in range(0, self.n, self.rows):
            for v0 in range(0, self.v, self.cols):
                yield slice(t0, min(t0 + self.rows, self.n)), slice(v0, min(v0 + self.cols, self.v))

    def forward(self, hp, wp, hq, wq) -> None:
        import torch

        for rows, cols in self._tiles():
            n, c = rows.stop - rows.start, cols.stop - cols.start
            torch.mm(hp[rows], wp[cols].t(), out=self.s_buf[:n, :c])
            torch.mm(hq[rows], wq[cols].t(), out=self.t_buf[:n, :c])

    def backward(self, hp, wp) -> tuple[Any, Any]:
        import torch

        for rows, cols in self._tiles():
            n, c = rows.stop - rows.start, cols.stop - cols.start
            g = self.s_buf[:n, :c]
            torch.mm(hp[rows], wp[cols].t(), out=g)
            gh, gw = self.grad_hidden[rows], self.grad_weight[cols]
            if cols.start == 0:
                torch.mm(g, wp[cols], out=gh)
            else:
                gh.addmm_(g, wp[cols])
            if rows.start == 0:
                torch.mm(g.t(), hp[rows], out=gw)
            else:
                gw.addmm_(g.t(), hp[rows])
        return self.grad_hidden, self.grad_weight


def _method(name: str, inputs: Inputs) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) closures of one method on the inputs; fwd+bwd leaves the grads in hp/wp."""
    import torch

    hp, wp, hq, wq = inputs
    hp_, wp_ = hp.detach(), wp.detach()
    if name == "floor":
        floor = Floor(hp, wp)

        def floor_fwd_bwd():
            floor.forward(hp_, wp_, hq, wq)
            return floor.backward(hp_, wp_)

        return (lambda: floor.forward(hp_, wp_, hq, wq)), floor_fwd_bwd
    tokens = torch.randint(0, wp.shape[0], (hp.shape[0],), generator=torch.Generator().manual_seed(1))
    if name in LOSS_METHODS and name != "fused_logprob_kl":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as COLUMNS

        def logprob():  # trl's fused head as its trainers call it (their vocabulary tile width)
            return ChunkedLogProbFunction.apply(hp, wp, None, tokens, 1.0, COLUMNS, None, 1.0, ("log_probs",))[0]
    if name == "trl_kernel":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def fwd():
            return ChunkedDivergenceFunction.apply(hp, wp, None, hq, wq, None, 1.0, 1.0, 1.0, None, 1.0, None)[0]
    elif name == "trl_logprob":
        fwd = logprob
    elif name == "logprob+weighted_kl":
        from trl_rb.kl import linear_weighted_kl_sum

        weights = torch.ones(hp.shape[0])

        def fwd():
            return logprob().sum() + linear_weighted_kl_sum(hp, wp, hq, wq, weights)
    elif name == "fused_logprob_kl":
        from trl_rb.kl import linear_logprob_kl

        def fwd():
            lp, _, kl = linear_logprob_kl(hp, wp, tokens, hq, wq)
            return lp.sum() + kl.sum()
    elif name == "linear_token_kl":
        from trl_rb.kl import linear_token_kl

        def fwd():
            return linear_token_kl(hp, wp, hq, wq)
    else:
        from trl_rb.kl import linear_weighted_kl_sum

        weights = torch.ones(hp.shape[0])

        def fwd():
            return linear_weighted_kl_sum(hp, wp, hq, wq, weights)

    def fwd_bwd():
        hp.grad = wp.grad = None
        fwd().sum().backward()
        return hp.grad, wp.grad

    return fwd, fwd_bwd


def _worker_memory(method: str, head: str, n: int, backward: bool) -> dict:
    """In a fresh process: extra peak RSS (bytes) of one call beyond the inputs (and the gradients)."""
    h, v = HEADS[head]
    inputs = _inputs(n, h, v)
    hp, wp, hq, wq = inputs
    _warm_up(method, inputs, backward)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    fwd, fwd_bwd = _method(method, inputs)  # the floor's buffers are allocated here: they count
    out = fwd_bwd() if backward else fwd()
    extra = (_rss_kib("VmHWM") - base) * 1024
    if backward:
        extra -= sum(g.nbytes for g in out)
    return {"extra_bytes": extra}


def _warm_up(method: str, inputs: Inputs, backward: bool, vocab: int = _WARM_VOCAB) -> None:
    """One call on two rows and the first ``vocab`` rows of both heads: pages in the code and one-off buffers."""
    hp, wp, hq, wq = inputs
    small = (hp[:2].detach().requires_grad_(True), wp[:vocab].detach().requires_grad_(True), hq[:2], wq[:vocab])
    fwd, fwd_bwd = _method(method, small)
    out = fwd_bwd() if backward else fwd()
    del fwd, fwd_bwd, out, small


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _worker_time(head: str, n: int, repeats: int, methods: list[str], backward: bool, full_warm_up: bool) -> dict:
    """Median seconds per call of each method, forward and forward+backward, interleaved round-robin; and
    max |trl_kernel - linear_token_kl| over the tokens (with the largest KL, for the relative error)."""
    h, v = HEADS[head]
    inputs = _inputs(n, h, v)
    fns = {m: _method(m, inputs) for m in methods}
    kinds = [0, 1] if backward else [0]
    times: dict[str, list[float]] = {f"{m}/{k}": [] for m in methods for k in kinds}
    for m in methods:
        for k in kinds:
            if full_warm_up:
                fns[m][k]()
            else:
                _warm_up(m, inputs, k == 1)
    values = {}
    for _ in range(repeats):
        for m in methods:
            for k in kinds:
                seconds, out = _timed(fns[m][k])
                times[f"{m}/{k}"].append(seconds)
                if k == 0 and m in ("trl_kernel", "linear_token_kl"):
                    values[m] = out.detach()
                del out
    result: dict[str, Any] = {"fwd": {m: statistics.median(times[f"{m}/0"]) for m in methods}}
    result["fwd_bwd"] = {m: statistics.median(times[f"{m}/1"]) for m in methods} if backward else {}
    if len(values) == 2:
        a, b = values["trl_kernel"], values["linear_token_kl"]
        result.update(max_abs_diff=(a - b).abs().max().item(), max_kl=a.abs().max().item())
    return result


def _run_worker(args: list[str], threads: int) -> dict:
    return run_worker(__file__, args, threads)


def _need_bytes(n: int, h: int, v: int) -> int:
    """Inputs + gradients + saved gradients (linear_weighted_kl_sum) + the largest method's buffers, float32."""
    from trl.kernels.chunked_divergence import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE

    inputs = 2 * (n * h + v * h) * 4
    grads = 2 * (n * h + v * h) * 4
    from trl_rb.kl import _LINEAR_CHUNK_ROWS

    tiles = 2 * min(n, TOKEN_CHUNK_SIZE) * VOCAB_CHUNK_SIZE * 4
    return inputs + grads + max(tiles, _LINEAR_BUFFERS_PER_ROW * min(n, _LINEAR_CHUNK_ROWS) * v)


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _run_case(head: str, n: int, repeats: int, threads: int, backward: bool, full_warm_up: bool) -> dict:
    h, v = HEADS[head]
    row: dict[str, Any] = {"head": head, "N": n, "H": h, "V": v, "need_bytes": _need_bytes(n, h, v)}
    if row["need_bytes"] > available_bytes() * _MEM_FRACTION:
        print(f"{head} N={n}: skipped (memory)", file=sys.stderr, flush=True)
        return {**row, "skipped": "memory"}
    print(f"{head} (H={h}, V={v}) N={n}: timing, then memory ...", file=sys.stderr, flush=True)
    spec = ["time", head, str(n), str(repeats), ",".join(METHODS), str(int(backward)), str(int(full_warm_up))]
    timing = _run_worker(spec, threads)
    if "error" in timing:
        print(f"  timing failed: {timing['error']}", file=sys.stderr)
    row.update({k: timing.get(k) for k in ("fwd", "fwd_bwd", "max_abs_diff", "max_kl", "error")})
    for key, bwd in (("mem_fwd", False), ("mem_fwd_bwd", True)):
        if bwd and not backward:
            row[key] = {}
            continue
        row[key] = {
            m: _run_worker(["memory", m, head, str(n), str(int(bwd))], threads).get("extra_bytes") for m in METHODS
        }
    return row


def run(
    heads: list[str], sizes: list[int], repeats: int, threads: int, backward: bool, full_warm_up: bool = True
) -> list[dict]:
    return [_run_case(head, n, repeats, threads, backward, full_warm_up) for head in heads for n in sizes]


def _case_table(r: dict) -> list[str]:
    lines = [f"### {r['head']} (H={r['H']}, V={r['V']}), N={r['N']}", ""]
    if r.get("skipped"):
        return [*lines, "skipped (memory)", ""]
    if r.get("error"):
        lines += [f"timing failed: {r['error']}", ""]
    fwd, fb = r.get("fwd") or {}, r.get("fwd_bwd") or {}
    mem, mem_b = r.get("mem_fwd") or {}, r.get("mem_fwd_bwd") or {}
    lines += [
        "| KL method | fwd ms | fwd+bwd ms | fwd / trl | fwd+bwd / trl | fwd+bwd / floor | peak extra MiB (fwd+bwd) "
        "| peak extra MiB (fwd) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in KL_METHODS:
        lines.append(
            f"| {m} | {_fmt_ms(fwd.get(m))} | {_fmt_ms(fb.get(m))} | {_ratio(fwd.get(m), fwd.get('trl_kernel'))} | "
            f"{_ratio(fb.get(m), fb.get('trl_kernel'))} | {_ratio(fb.get(m), fb.get('floor'))} | "
            f"{_fmt_mb(mem_b.get(m))} | {_fmt_mb(mem.get(m))} |"
        )
    base, before = fb.get("trl_logprob"), fb.get("logprob+weighted_kl")
    lines += [
        "",
        "| loss-step LM head | products | fwd ms | fwd+bwd ms | fwd+bwd / trl_logprob | fwd+bwd / logprob+weighted_kl "
        "| peak extra MiB (fwd+bwd) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in LOSS_METHODS:
        lines.append(
            f"| {m} | {LOSS_PRODUCTS[m]} | {_fmt_ms(fwd.get(m))} | {_fmt_ms(fb.get(m))} | {_ratio(fb.get(m), base)} | "
            f"{_ratio(fb.get(m), before)} | {_fmt_mb(mem_b.get(m))} |"
        )
    if r.get("max_abs_diff") is not None:
        rel = r["max_abs_diff"] / max(r["max_kl"], 1e-30)
        lines += [
            "",
            f"max |trl_kernel - linear_token_kl| per token: {r['max_abs_diff']:.3g} "
            f"(max KL {r['max_kl']:.3g}, relative {rel:.2g})",
        ]
    return [*lines, ""]


def table(rows: list[dict], threads: int) -> str:
    import torch

    lines = [
        f"machine: {_machine()}; torch {torch.__version__}; {threads} thread(s). float32, CPU; time = median ms; "
        "peak extra = peak RSS beyond the inputs (fwd+bwd: and beyond the gradients), MiB.",
        "",
    ]
    for r in rows:
        lines += _case_table(r)
    return "\n".join(lines)


def _worker(spec: list[str]) -> dict:
    kind, *rest = spec
    if kind == "memory":
        method, head, n, backward = rest
        return _worker_memory(method, head, int(n), backward == "1")
    head, n, repeats, methods, backward, full_warm_up = rest
    return _worker_time(head, int(n), int(repeats), methods.split(","), backward == "1", full_warm_up == "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N in {64, 128}, 1 repeat, small warm-up calls"
    )
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated heads of {list(HEADS)}")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 512,2048,8192; quick 64,128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 3; 1 quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--backward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time and measure forward+backward (default: yes)",
    )
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args.worker)))
        return 0

    heads = args.heads.split(",")
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        parser.error(f"unknown head(s) {unknown}; choose from {list(HEADS)}")
    sizes = [int(x) for x in (args.sizes or ("64,128" if args.quick else "512,2048,8192")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    rows = run(heads, sizes, repeats, args.threads, args.backward, full_warm_up=not args.quick)
    print(table(rows, args.threads))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"machine": _machine(), "torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1
            )
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
