"""LeNet-300-100 on `mnist5k` pruned by automated gradual pruning: the README's schedule comparison.

Training recipe of configs/lenet300_mnist5k.py (OpenLTH `mnist_lenet_300_100`: SGD lr 0.1,
batch 128, no momentum, global magnitude pruning, output layer `out` not pruned). AGP as in
Zhu & Gupta 2017 (arXiv:1710.01878): density falls as a cubic from 1 to `final_density` between
`prune_start` and `prune_end`, a new mask every `prune_every`, then training goes on at the final
density. Matched to IMP level 14 of configs/lenet300_mnist5k.py: the same final density (its exact
kept count, 11,664 of 265,200 prunable weights = 0.8^14 rounded per level) and the same total
training, 15 levels x 40 epochs = 600 epochs. The schedule (dense for the first 40 epochs, pruning
until epoch 340, 260 epochs at the final density) was chosen before any run, not tuned.
"""

from lottery.gradual import base_config


def get_config():
    c = base_config("agp")
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.final_density = 11664 / 265200
    c.training_steps = "600ep"
    c.prune_start = "40ep"
    c.prune_end = "340ep"
    c.prune_every = "1ep"
    return c
