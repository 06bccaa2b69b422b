"""LeNet-300-100 on the offline `mnist5k` digits: the README's main ticket search.

OpenLTH's `mnist_lenet_300_100` recipe (models/mnist_lenet.py: SGD lr 0.1, batch 128, no momentum,
40 epochs, global magnitude pruning of 0.2 per level, output layer `fc` not pruned), on 4,000
training digits, with OpenLTH's init (Kaiming-normal kernels, PyTorch-default biases U(+-1/sqrt(fan_in)):
the base config's `bias_init='torch'`). 20 levels reach 0.8^20 = 1.2% density (level 14: 4.4%). Controls (random
re-initialization, random pruning at equal layer densities; 2 seeds each) on every second level.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.levels = 20
    c.controls = "reinit,random_prune"
    c.control_seeds = 2
    c.control_levels = "2,4,6,8,10,12,14,16,18,20"
    return c
