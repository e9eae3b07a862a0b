"""The command line shared by ``runtime.examples.gcn`` and ``runtime.examples.gat``.

    python -m runtime.examples.gcn --dataset cora --data-dir PATH [--mixed-precision] [--profile runs/gcn]
                                   [--seeds 10] [--tsne runs/gcn_cora_tsne] [--epochs N]

One run trains with the paper's hyperparameters and early stopping, prints the test accuracy and the
time per epoch, and writes a t-SNE of the final hidden node features coloured by class as
``<tsne>.png`` (matplotlib, ``pip install -e ".[gnn]"``) and ``<tsne>.html`` (plotly, interactive).
``--seeds N`` trains seeds 0..N-1 and prints each accuracy and the mean and standard deviation.
``--profile DIR`` records the run with ``insight.Profiler`` (open it with ``insight start``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from runtime import context
from runtime.models import gnn
from runtime.dataset.planetoid import ENV_VAR, PlanetoidFormatError, load_planetoid


def parse(model: str, argv=None):
    p = argparse.ArgumentParser(prog=f"python -m runtime.examples.{model}",
                                description=f"{model.upper()} on a Planetoid citation graph (Cora, Citeseer)")
    p.add_argument("--dataset", default="cora", choices=["cora", "citeseer"])
    p.add_argument("--data-dir", default=None, help=f"directory of the ind.<name>.* files (default: ${ENV_VAR})")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute, float32 masters, loss scaling")
    p.add_argument("--profile", default=None, metavar="DIR", help="record the run with insight.Profiler into DIR")
    p.add_argument("--seeds", type=int, default=0, metavar="N", help="train seeds 0..N-1, print mean and std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the paper's)")
    p.add_argument("--tsne", default=None, metavar="PREFIX",
                   help="write the t-SNE as PREFIX.png and PREFIX.html (default: runs/<model>_<dataset>_tsne)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE picture")
    return p.parse_args(argv)


def tsne_figure(hidden: np.ndarray, labels: np.ndarray, title: str, prefix: str | Path, seed: int = 0) -> list[Path]:
    """t-SNE (scikit-learn) of node features coloured by class: PREFIX.html (plotly) and PREFIX.png
    (matplotlib, when installed). Returns the files written."""
    import plotly.graph_objects as go
    from sklearn.manifold import TSNE

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    keep = labels >= 0
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(
        hidden[keep].astype(np.float64))
    y = labels[keep]
    written = []
    fig = go.Figure()
    for c in np.unique(y):
        m = y == c
        fig.add_trace(go.Scattergl(x=xy[m, 0], y=xy[m, 1], mode="markers", name=f"class {c}",
                                   marker={"size": 4}, text=[f"node {i}" for i in np.nonzero(keep)[0][m]]))
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, width=800, height=700)
    html = prefix.with_suffix(".html")
    fig.write_html(str(html), include_plotlyjs="cdn")
    written.append(html)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[gnn]'): skipping the PNG", file=sys.stderr)
        return written
    figm, ax = plt.subplots(figsize=(7, 7), dpi=120)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=4)
    ax.legend(*sc.legend_elements(), title="class", loc="best", fontsize=8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    png = prefix.with_suffix(".png")
    figm.savefig(png, bbox_inches="tight")
    plt.close(figm)
    written.append(png)
    return written


def _profiled(path):
    import insight  # examples may use the profiler; the runtime proper never imports it

    return insight.Profiler(output_path=path, overwrite=True)


def main(model: str, argv=None) -> int:
    args = parse(model, argv)
    context.set_context(mode=context.GRAPH_MODE)
    try:
        data = load_planetoid(args.dataset, args.data_dir)
    except PlanetoidFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tag = " (mixed precision)" if args.mixed_precision else ""
    if args.seeds:
        accs = []
        for seed in range(args.seeds):
            r = gnn.train(model, data, seed=seed, mixed_precision=args.mixed_precision, epochs=args.epochs)
            accs.append(r.test_acc)
            print(f"seed {seed}: test accuracy {r.test_acc:.1f}%  (val {r.val_acc:.1f}%, {r.epochs} epochs, "
                  f"{r.epoch_ms:.1f} ms/epoch with the validation pass)", flush=True)
        print(f"{model.upper()} {args.dataset}{tag}: test accuracy {np.mean(accs):.2f} +- {np.std(accs):.2f} % "
              f"over {args.seeds} seeds")
        return 0
    profiler = _profiled(args.profile) if args.profile else None
    try:
        r = gnn.train(model, data, seed=args.seed, mixed_precision=args.mixed_precision, epochs=args.epochs,
                      keep_hidden=not args.no_tsne)
    finally:
        if profiler is not None:
            profiler.stop()
    print(f"{model.upper()} {args.dataset}{tag} seed {args.seed}: test accuracy {r.test_acc:.1f}% "
          f"(val {r.val_acc:.1f}%), {r.epochs} epochs, {r.epoch_ms:.1f} ms/epoch "
          f"(with the validation pass), {r.train_seconds:.2f} s")
    if args.mixed_precision:
        print(f"loss-scale overflows skipped: {r.overflow_skips}")
    if profiler is not None:
        print(f"profile written to {args.profile} (insight report {args.profile} / insight start)")
    if not args.no_tsne:
        prefix = args.tsne or f"runs/{model}_{args.dataset}_tsne"
        files = tsne_figure(r.hidden, data.labels, f"t-SNE of {model.upper()} hidden features, {args.dataset}",
                            prefix, seed=args.seed)
        print("t-SNE written to " + ", ".join(str(f) for f in files))
    return 0
