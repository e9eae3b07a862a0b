"""Wide&Deep on Criteo-like data, with the embedding tables on the device or on the host.

    python -m runtime.examples.wide_deep [--rows N] [--vocab-scale S] [--host] [--profile runs/wd]

Generates N training rows (and N/5 test rows) from ``runtime.dataset.criteo_synthetic`` (Criteo's
26 per-field cardinalities times S, Zipf ids, a planted logistic truth), trains one epoch of
Wide&Deep (FTRL on the wide part, LazyAdam on the deep part, data sink mode) and prints the test AUC
next to the Bayes-optimal AUC. ``--data FILE`` trains on a real Criteo text file instead (hashed
vocabulary, ``--buckets`` per field; the last fifth of the batches is held out).

Without ``--host`` the tables and their optimizer slots must fit the device (``--device-memory``,
default 1GB): if they do not, the DeviceOutOfMemoryError is printed (it names the tables) and the
example suggests ``--host``. With ``--host`` the tables, lookups and sparse optimizers run on the host
and the host optimizer of step k overlaps the device's step k+1. ``--profile DIR`` records the run
for ``insight report DIR`` / the dashboard (timeline: host stream vs device streams, copies with bytes).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from runtime import context
from runtime.dataset import GeneratorDataset
from runtime.dataset.criteo import CriteoVocab, criteo_dataset
from runtime.dataset.criteo_synthetic import CriteoSynthetic, model_batches
from runtime.device import DeviceOutOfMemoryError
from runtime.device.memory import fmt_bytes
from runtime.models.wide_deep import WideDeepConfig, auc, build_model, predict_scores


def batches_dataset(xs, ys):
    def rows():
        return iter(zip(xs, ys))
    return GeneratorDataset(rows, ["data", "label"])


def synthetic(rows: int, vocab_scale: float, batch: int, seed: int):
    gen = CriteoSynthetic(vocab_scale=vocab_scale, zipf=1.3, wide_std=0.35, interaction_std=0.8, rank=2, seed=seed)
    t0 = time.perf_counter()
    train, test = gen.sample(rows, seed=1), gen.sample(max(batch, rows // 5), seed=2)
    xs, ys, vocab = model_batches(gen, train, batch)
    xt, yt, _ = model_batches(gen, test, batch)
    bayes = auc(np.concatenate(yt), test.logit[:len(yt) * batch])
    print(f"data: {len(xs) * batch:,} training rows, {len(xt) * batch:,} test rows, vocabulary {vocab:,} ids "
          f"(Criteo's cardinalities x {vocab_scale:g}), generated in {time.perf_counter() - t0:.1f} s")
    return xs, ys, xt, yt, vocab, bayes


def criteo_file(path: str, buckets: int, batch: int):
    vocab = CriteoVocab.hashed(buckets)
    ds, reader = criteo_dataset(path, vocab, batch, skip_bad_lines=True)
    pairs = list(ds)
    if reader.bad_lines:
        print(f"skipped {reader.bad_lines} bad line(s): {reader.bad_examples[0]}")
    cut = max(1, len(pairs) * 4 // 5)
    xs, ys = [p[0] for p in pairs[:cut]], [p[1] for p in pairs[:cut]]
    xt, yt = [p[0] for p in pairs[cut:]], [p[1] for p in pairs[cut:]]
    print(f"data: {path}: {len(xs) * batch:,} training rows, {len(xt) * batch:,} held out; hashed vocabulary "
          f"{vocab.vocab_size:,}")
    return xs, ys, xt, yt, vocab.vocab_size, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="training rows (synthetic data)")
    ap.add_argument("--vocab-scale", type=float, default=5e-5, help="Criteo's per-field cardinalities times this")
    ap.add_argument("--host", action="store_true", help="embedding tables and sparse optimizers on the host")
    ap.add_argument("--profile", metavar="DIR", help="record the run with insight.Profiler into DIR")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--dim", type=int, default=8, help="embedding dimension (the zoo: 80)")
    ap.add_argument("--deep", default="64,32", help="deep layer sizes (the zoo: 1024,512,256,128)")
    ap.add_argument("--zoo", action="store_true", help="the model zoo's sizes: dim 80, deep 1024-512-256-128")
    ap.add_argument("--device-memory", default="1GB")
    ap.add_argument("--data", help="a Criteo text file instead of synthetic data")
    ap.add_argument("--buckets", type=int, default=100_000, help="hash buckets per categorical field (--data)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    context.set_context(mode=context.GRAPH_MODE, seed=a.seed, device_memory=a.device_memory)

    if a.data:
        xs, ys, xt, yt, vocab, bayes = criteo_file(a.data, a.buckets, a.batch)
    else:
        xs, ys, xt, yt, vocab, bayes = synthetic(a.rows, a.vocab_scale, a.batch, a.seed)
    if a.zoo:
        cfg = WideDeepConfig.zoo(vocab_size=vocab, batch_size=a.batch)
    else:
        cfg = WideDeepConfig.small(vocab_size=vocab, batch_size=a.batch, emb_dim=a.dim,
                                   deep_layers=tuple(int(d) for d in a.deep.split(",")), adam_lr=5e-3,
                                   ftrl_lr=0.05, ftrl_initial_accum=1e-4)
    table_bytes = vocab * (cfg.emb_dim * 3 + 3) * 4
    print(f"model: Wide&Deep dim {cfg.emb_dim}, deep {'-'.join(map(str, cfg.deep_layers))}, batch {a.batch}; "
          f"tables + optimizer slots {fmt_bytes(table_bytes)} on the {'host' if a.host else 'device'} "
          f"(device capacity {a.device_memory})")
    net, model = build_model(cfg, host=a.host)
    try:
        model.train_graph(xs[0], ys[0])
    except DeviceOutOfMemoryError as e:
        print(f"\nthe tables do not fit the device:\n{e}\n\n-> run with --host to keep them on the host")
        return 1

    profiler = None
    if a.profile:
        import insight  # the profiler is optional for the runtime; the example uses it on request
        profiler = insight.Profiler(output_path=a.profile)
    t0 = time.perf_counter()
    try:
        model.train(1, batches_dataset(xs, ys), dataset_sink_mode=True)
    finally:
        if profiler is not None:
            profiler.stop()
    secs = time.perf_counter() - t0
    exe = model.train_graph(xs[0], ys[0])
    mem = exe.memory_summary()
    print(f"trained 1 epoch: {len(xs)} steps in {secs:.1f} s, {len(xs) * a.batch / secs:,.0f} samples/s")
    print(f"device: parameters {fmt_bytes(mem['parameters'])} + activations {fmt_bytes(mem['planned_peak'])}; "
          f"host parameters {fmt_bytes(mem['host_parameters'])}")
    scores = predict_scores(model, xt)
    got = auc(np.concatenate(yt), scores)
    print(f"test AUC {got:.4f}" + (f"  (Bayes-optimal {bayes:.4f}, gap {bayes - got:.4f})" if bayes else ""))
    if a.profile:
        print(f"profile: {a.profile} (insight report {a.profile})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
