"""Conv-6 on CIFAR-10 (needs TFDS `cifar10` prepared in the data dir).

Frankle & Carbin 2019, Figure 2 / Appendix: Adam lr 3e-4, batch 60, 30000 iterations, conv layers
pruned at 0.15 and fully-connected at 0.2 per round, the output layer at 0.1, each layer on its own
(layerwise). Here: layerwise fraction 0.2 with rate multipliers conv 0.75 (0.15 / 0.2), output 0.5.
"""

import conv2_cifar10


def get_config():
    c = conv2_cifar10.get_config()
    c.model = "conv6"
    c.lr = 3e-4
    c.training_steps = "30000it"
    c.rates = "conv.*=0.75,out=0.5"
    return c
