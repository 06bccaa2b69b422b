"""LeNet-300-100 on the offline `mnist5k` digits: the README's main ticket search.

OpenLTH's `mnist_lenet_300_100` recipe (models/mnist_lenet.py: SGD lr 0.1, batch 128, no momentum,
40 epochs, global magnitude pruning of 0.2 per level, output layer `fc` not pruned), on 4,000
training digits. 14 levels reach 0.8^14 = 4.4% density.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.levels = 14
    c.controls = "reinit,random_prune"
    c.control_seeds = 2
    c.control_levels = "3,7,10,12,14"
    return c
