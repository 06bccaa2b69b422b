"""Pruning at initialization of the MNIST-1D CNN (Greydanus 2020) on the offline `mnist1d` data.

The mnist1d reference recipe (Adam lr 1e-2, batch 100; published CNN accuracy 94% after 6,000
iterations), shortened to 3,000 iterations. Pruning as in Synaptic Flow's paper runs
(the Synaptic-Flow code's singleshot args.json): global scope, every kernel prunable (the output layer too), SynFlow
100 rounds on the exponential schedule, the other scorers one-shot, SNIP/GraSP on 100 training
examples. The CNN has only 5,125 prunable weights, so the sweep stops at compression 100
(51 weights kept); compression = prunable weights / kept = 1 / density.
"""

from lottery.pai import base_config


def get_config():
    c = base_config()
    c.dataset = "mnist1d"
    c.model = "cnn_mnist1d"
    c.optimizer = "adam"
    c.lr = 1e-2
    c.batch_size = 100
    c.training_steps = "3000it"
    c.eval_every = "500it"
    c.scorers = "snip,grasp,synflow,magnitude,random"
    c.compressions = "1,10^0.5,10,10^1.5,100"
    c.seeds = 3
    return c
