"""Conv-4 on CIFAR-10 (needs TFDS `cifar10` prepared in the data dir).

Frankle & Carbin 2019, Figure 2 / Appendix: Adam lr 3e-4, batch 60, 25000 iterations, conv layers
pruned at 0.1 and fully-connected at 0.2 per round, the output layer at 0.1, each layer on its own
(layerwise). Here: layerwise fraction 0.2 with rate multipliers conv 0.5 (0.1 / 0.2), output 0.5.
"""

import conv2_cifar10


def get_config():
    c = conv2_cifar10.get_config()
    c.model = "conv4"
    c.lr = 3e-4
    c.training_steps = "25000it"
    return c
