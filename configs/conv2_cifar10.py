"""Conv-2 on CIFAR-10 (needs TFDS `cifar10` prepared in the data dir).

Frankle & Carbin 2019, Figure 2 / Appendix: Adam lr 2e-4, batch 60, 20000 iterations, conv layers
pruned at 0.1 and fully-connected at 0.2 per round, the output layer at 0.1, each layer on its own
(layerwise). Here: layerwise fraction 0.2 with rate multipliers conv 0.5 (0.1 / 0.2), output 0.5.
Init as the paper's TensorFlow code: Glorot-normal kernels (the model's), zero biases.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "cifar10"
    c.model = "conv2"
    c.bias_init = "zeros"
    c.batch_size = 60
    c.optimizer = "adam"
    c.lr = 2e-4
    c.training_steps = "20000it"
    c.eval_every = "1000it"
    c.scope = "layerwise"
    c.exclude = ""
    c.rates = "conv.*=0.5,out=0.5"
    c.levels = 15
    return c
