"""Fleet fine-tuning of the default model: 3 clients on disjoint shards of the shipped corpus, 2 rounds.

A real fleet on 127.0.0.1 (TLS SuperLink with SuperNode authentication, one SuperNode per client,
Flower's subprocess isolation), the same path as ``edgetune fleet simulate``. Prints the held-out
loss of the base and of the aggregated adapter after each round (edgetune/data/instructions_heldout.jsonl)
and the bytes each client sent per round against the adapter's size. Asserts nothing.

    OMP_NUM_THREADS=1 flock /tmp/edgetune-heavy.lock python benchmarks/fleet.py

Each client process loads the default model once per round (Flower runs a ClientApp process per
message), so on a shared 2-core machine a run takes several minutes; keep --local-steps and
--seq-len small.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parent.parent / "edgetune" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--work", type=Path, default=None, help="keep the compiled model and outputs here")
    args = p.parse_args()

    import torch

    import edgetune
    from edgetune.api import attach_adapter
    from edgetune.evaluate import evaluate_loss
    from edgetune.fleet.run import simulate
    from edgetune.training.data import build_dataset

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = args.work or Path(tempfile.mkdtemp(prefix="edgetune-fleet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    compiled = work / "default.qlora"
    if not compiled.is_dir():
        model, tok = edgetune.load("default")
        edgetune.save(edgetune.compile(model, recipe="qlora", device="cpu-16gb", r=args.r, alpha=2 * args.r),
                      compiled, tok)
        del model
    print(f"compiled default with qlora r={args.r} in {time.perf_counter() - t0:.0f} s")

    lines = (DATA / "instructions.jsonl").read_text().splitlines()
    shards = work / "shards"
    shards.mkdir(exist_ok=True)
    for i in range(args.clients):  # contiguous blocks: each client sees different instructions
        n = len(lines) // args.clients
        (shards / f"shard-{i}.jsonl").write_text("\n".join(lines[i * n:(i + 1) * n]) + "\n")

    model, tok = edgetune.load_compiled(compiled)  # its adapter starts at B = 0: the base's outputs
    heldout = build_dataset(DATA / "instructions_heldout.jsonl", tok, args.seq_len)
    base_loss = evaluate_loss(model, heldout)["loss"]
    print(f"held-out loss of the base: {base_loss:.4f} ({len(heldout)} sequences of {args.seq_len} tokens)")

    out = work / "fleet"
    t1 = time.perf_counter()
    rows = []

    def on_round(record):
        attach_adapter(model, out / f"round-{record['round']:03d}")
        loss = evaluate_loss(model, heldout)["loss"]
        rows.append((record, loss, time.perf_counter() - t1))

    simulate(compiled, sorted(shards.iterdir()), out, rounds=args.rounds, overwrite=True,
             local_steps=args.local_steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, on_round=on_round)
    print(f"\n{args.clients} clients x {args.local_steps} local steps (batch {args.batch}, seq-len {args.seq_len}, "
          f"lr {args.lr}), {args.rounds} rounds")
    print(f"{'round':>5} {'held-out loss':>14} {'vs base':>8} {'clients':>7} {'bytes sent per client':>34} "
          f"{'adapter bytes':>14} {'max ratio':>9} {'elapsed s':>9}")
    for record, loss, elapsed in rows:
        sent = [c["bytes_sent"] for c in record["clients"]]
        ratio = max(c["bytes_ratio"] for c in record["clients"]) if record["clients"] else float("nan")
        print(f"{record['round']:>5} {loss:>14.4f} {loss - base_loss:>+8.4f} {len(sent):>7} "
              f"{','.join(f'{s:,}' for s in sent):>34} {record['adapter_bytes']:>14,} {ratio:>9.4f} {elapsed:>9.0f}")
    print(f"aggregated adapter: {out / 'adapter'}")


if __name__ == "__main__":
    main()
