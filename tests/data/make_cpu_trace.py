"""Fixture script: the small CPU torch.profiler trace that tests/test_import.py imports.

    pip install torch==2.13.0   # (the CPU build, 2.13.0+cpu, is the same profiler)
    python tests/data/make_cpu_trace.py            # writes tests/data/torch_cpu_mlp.pt.trace.json.gz

A two-layer MLP trained with SGD for a few steps on random data through a DataLoader, profiled with
``torch.profiler.profile(activities=[CPU], schedule=schedule(wait=1, warmup=1, active=3),
record_shapes=True, profile_memory=True)``, so the trace holds ``ProfilerStep#N`` annotations, cpu_op
events with input shapes, the DataLoader's ``enumerate(DataLoader)#...__next__`` ranges, the optimizer's
``Optimizer.step#SGD.step`` annotation, autograd's backward ops and ``[memory]`` instant events.
Deterministic model and data (seeded); the timings are whatever the machine measured.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.data import DataLoader, TensorDataset

OUT = Path(__file__).resolve().parent / "torch_cpu_mlp.pt.trace.json.gz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=3),
                     record_shapes=True, profile_memory=True,
                     on_trace_ready=lambda p: p.export_chrome_trace(raw)) as prof:
            for step, (xb, yb) in enumerate(loader):
                if step == 5:
                    break
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                prof.step()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as src, gzip.GzipFile(args.output, "wb", compresslevel=9, mtime=0) as dst:
            shutil.copyfileobj(src, dst)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
