"""The MNIST-1D CNN (Greydanus 2020) on the offline `mnist1d` data.

Reference training (mnist1d paper / package defaults): Adam lr 1e-2, batch 100, 6,000 iterations;
published test accuracy of this CNN: 94%.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "mnist1d"
    c.model = "cnn_mnist1d"
    c.optimizer = "adam"
    c.lr = 1e-2
    c.batch_size = 100
    c.training_steps = "6000it"
    c.eval_every = "500it"
    c.levels = 10
    return c
