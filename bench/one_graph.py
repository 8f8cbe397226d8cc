"""One compiled graph pair for every decoder layer (an experiment of issue 20, the `*-onegraph` variants of
bench/run_qlora_lit.py): without checkpointing, layer 0's input (the frozen embeddings' output) needs no gradient and
the others' do, so torch.compile builds two forward and two backward graphs, and the first step compiles (or loads
from the cache) both. Making the embeddings' output need a gradient leaves one pair, at the cost of layer 0's input
gradient, computed and thrown away (about one layer's forward matrix products: 1-3% of a step at 1B-8B).
On the CPU machine (tiny model, cold cache): 2 graphs and 31.6 s to the first gradients, against 1 and 23.6 s.
"""

from __future__ import annotations

import lightning as L


class OneLayerGraph(L.Callback):
    """Makes the input embeddings' output need a gradient once the model is built."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        module.model.enable_input_require_grads()
