"""The MNIST-1D CNN (Greydanus 2020) on the offline `mnist1d` data.

Reference training (mnist1d paper / package defaults): Adam lr 1e-2, batch 100, 6,000 iterations;
published test accuracy of this CNN: 94%.
"""

import mlp_mnist1d


def get_config():
    c = mlp_mnist1d.get_config()
    c.model = "cnn_mnist1d"
    return c
