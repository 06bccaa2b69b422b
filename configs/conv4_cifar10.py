"""Conv-4 on CIFAR-10 (needs TFDS `cifar10` prepared in the data dir).

Frankle & Carbin 2019, Figure 2 / Appendix: Adam lr 3e-4, batch 60, 25000 iterations, conv layers
pruned at 0.15 and fully-connected at 0.2 per round, output layer at half the fc rate. Here one global
fraction of 0.2 with rate multipliers: conv 0.75 (0.15 / 0.2), output 0.5.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "cifar10"
    c.model = "conv4"
    c.batch_size = 60
    c.optimizer = "adam"
    c.lr = 3e-4
    c.training_steps = "25000it"
    c.eval_every = "1000it"
    c.scope = "layerwise"
    c.exclude = ""
    c.rates = "conv.*=0.75,out=0.5"
    c.levels = 15
    return c
