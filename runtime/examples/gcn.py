"""GCN on Cora / Citeseer with the paper's hyperparameters.

    python -m runtime.examples.gcn --dataset cora --data-dir PATH [--mixed-precision] [--profile runs/gcn]
                                  [--seeds 10]

See ``runtime/examples/gnn_common.py`` for every option (t-SNE output, epochs).
"""
import sys

from runtime.examples.gnn_common import main

if __name__ == "__main__":
    sys.exit(main("gcn"))
