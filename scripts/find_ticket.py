"""Find lottery tickets by IMP: the same as `lottery find-ticket`, for people who run scripts.

    python scripts/find_ticket.py --config configs/lenet300_mnist5k.py [--config.<field>=<value>]
"""

import sys

from lottery import cli

if __name__ == "__main__":
    sys.exit(cli.main(["find-ticket", *sys.argv[1:]]))
