"""Pruning at initialization: scorers x compression ratios, each sparse network trained, compared.

The experiment of Tanaka et al. 2020 (Synaptic Flow, arXiv:2006.05467, Fig. 6): for every scorer
and compression ratio, build a mask from the network AT INITIALIZATION, check for layer collapse,
train the sparse network from that same initialization, and record its test accuracy.

Units: the sweep axis is the compression ratio over the PRUNABLE weights,
compression = prunable weights / kept prunable weights = 1 / density (>= 1; 10 keeps 10%).
It is not ShrinkBench's ratio (`masks.compression_ratio`), which counts every parameter.
A sweep may be given in densities instead (`densities`, in (0, 1]); never both.
A cell keeps round-half-up(N / compression) of the N prunable weights (`prune.to_density`).

Pruning (defaults follow the Synaptic-Flow code's single-shot paper runs): global scope,
every kernel prunable including the output layer (`exclude = ""`); SynFlow iterative with 100
rounds on the exponential schedule, the other scorers in one shot (`rounds = "synflow=100"`).
SNIP and GraSP score on `prune_examples` training examples (0 = 10 x number of classes), drawn
with `prune_seed`, with the training augmentation applied (`prune_augment`), in batches of
`prune_batch_size` whose gradients are summed. At compression 1 no scorer runs: the mask is dense.

Seeds: `seeds` replicates with seed = cfg.seed, cfg.seed + 1, ...; seed s gives the init
(`fold_in(key(s), 0)`, the same init as `find-ticket` with seed=s), the data order
(`fold_in(key(s), 1)`), the `random` scorer's key (`fold_in(key(s), 2)`) and the draw of the
prune examples (`fold_in(key(prune_seed), s)`). Every scorer sees the same inits, so the
comparison is paired. The seeds of one (scorer, compression) cell train together as vmapped
replicas (`train.train(..., replicas=True)`) with the training recipe of the config (as in
`find-ticket`; its IMP-only fields are ignored).

Sanity checks (Frankle et al. 2021, "Pruning Neural Networks at Initialization: Why Are We
Missing the Mark?", arXiv:2009.08576): `ablations`, a comma-separated subset of ABLATIONS, adds
for every scorer except `random` (its own control) and every point a cell `<scorer>+<ablation>`:
  shuffle  the scorer's mask with each prunable layer's entries randomly permuted within the layer
           (same per-layer counts; layer i of seed s permuted with key fold_in(fold_in(key(s), 3),
           i)), trained from the same init as the unablated cell;
  reinit   the scorer's mask, trained from a fresh init drawn with fold_in(key(s), 4);
  invert   the mask of the negated scores (the highest-scoring weights pruned) at the same
           density, by the same procedure (rounds and schedule) as the scorer.
Every cell starts from the UNMASKED init values of its weights source under its own mask
(`start_states`), with the seed's data order. Ablations are left out of the run hash: they only
extend a sweep.

Run directory `<workdir>/prune-at-init_<model>_<dataset>_<hash>/` (hash of the config, as
`config.run_name`):
  config.json
  <cell>/<point>/              cell = <scorer> or <scorer>+<ablation>;
                               point = c<compression> (or d<density> for a density sweep)
    s<seed>/mask/              orbax bool mask (the params' structure)
    s<seed>/metrics.jsonl      eval records: step, train_loss, test_loss, test_accuracy
    s<seed>/info.json          {density, kept, total, layers: {path: {kept, total}}}
    collapse.json              {scorer, ablation (null for none), init_stream (0: the seed's
                                init, 4: the reinit draw), compression, density, rounds, schedule,
                                reused_from, collapsed: {"<seed>": [prunable layer paths with no
                                weight left]}}
    DONE                       written last: the cell is finished
  accuracy_vs_compression.png  written by the command line (`plot`)
Resume: finished (DONE) cells are skipped; an interrupted cell is deleted and computed again from
its start (masks and training), which gives the same result. A cell whose masks equal those of a
finished cell of another scorer at the same point (always the case at compression 1) with the same
weights source (init or reinit) copies its metrics instead of training again (`reused_from` names
it): training depends only on seed, weights and mask.

Modules: `spec` (config fields, points, cells, command-line flags), `ablations` (the sanity
checks), `runner` (masks, training, the run directory: `sweep`), `results` (rows, table,
figure). Their public names are re-exported here.
"""

from lottery.pai import ablations, results, runner, spec
from lottery.pai.ablations import inverted, reinit_key, shuffle_key, shuffle_mask
from lottery.pai.results import PLOT_NAME, describe, format_table, plot, summary
from lottery.pai.runner import (cell_dir, cell_masks, cell_variables, prune_at_init, prune_batches,
                                start_states, sweep)
from lottery.pai.spec import (ABLATIONS, EXPERIMENT, UNABLATED, Point, add_arguments,
                              apply_arguments, base_config, cell_name, cells, normalize,
                              parse_ablations, parse_points, parse_rounds, parse_scorers,
                              seed_list)

__all__ = ["ABLATIONS", "EXPERIMENT", "PLOT_NAME", "UNABLATED", "Point", "ablations",
           "add_arguments", "apply_arguments", "base_config", "cell_dir", "cell_masks",
           "cell_name", "cell_variables", "cells", "describe", "format_table", "inverted",
           "normalize", "parse_ablations", "parse_points", "parse_rounds", "parse_scorers", "plot",
           "prune_at_init", "prune_batches", "reinit_key", "results", "runner", "seed_list",
           "shuffle_key", "shuffle_mask", "spec", "start_states", "summary", "sweep"]
