"""CPU cost of the call observers (metrics) on the dispatcher's hot path, in one run.

    python3 -m scripts.bench_observers [--calls 5000] [--rounds 30]

Dispatches ``health`` lines in-process through a Dispatcher without observers and one with
the metrics observer, alternating, and reports the best CPU time per call of each (CPU time:
the socket round trip of scripts/bench_rpc.py is too noisy on a shared machine to resolve a
difference of a microsecond).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from azaiond.metrics import Metrics
from azaiond.rpc.dispatch import Dispatcher
from azaiond.rpc.table import Access, Call, MethodSpec, Peer

LINE = b'{"jsonrpc":"2.0","method":"health","id":1}'


def _health(call: Call) -> dict[str, str]:
    return {"status": "healthy"}


async def _per_call(dispatcher: Dispatcher, calls: int) -> float:
    peer = Peer(uid=0, gid=0, pid=1, is_admin=True)
    start = time.process_time()
    for _ in range(calls):
        await dispatcher.handle(LINE, peer)
    return (time.process_time() - start) / calls


async def _run(calls: int, rounds: int) -> None:
    table = {"health": MethodSpec("health", _health, Access.OPEN, blocking=False)}
    plain = Dispatcher(table, workers=1)
    observed = Dispatcher(table, workers=1, observers=(Metrics().observe_call,))
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(await _per_call(plain, calls))
        b.append(await _per_call(observed, calls))
    best_a, best_b = min(a) * 1e6, min(b) * 1e6
    print(f"CPU per health call: no observers {best_a:.2f} us, metrics observer {best_b:.2f} us "
          f"(+{best_b - best_a:.2f} us, x{best_b / best_a:.3f})")
    plain.close()
    observed.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    asyncio.run(_run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
