"""Prune at initialization over a scorer x compression sweep: the same as `lottery prune-at-init`.

    python scripts/prune_at_init.py --config configs/pai_lenet300_mnist5k.py \
        [--scorers snip,synflow] [--compression 1,10,100,1000] [--config.<field>=<value>]

--compression takes compression ratios over the prunable weights (prunable / kept = 1/density).
"""

import sys

from lottery import cli

if __name__ == "__main__":
    sys.exit(cli.main(["prune-at-init", *sys.argv[1:]]))
