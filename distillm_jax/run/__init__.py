"""The run layer: what one training run is made of and leaves behind — its folder's layout
(``folder.RunDir``), the lock that keeps it to one process (``lock``), the pieces built from a checked
config (``build.Run``: models, tokenizer, rows, sampler, validator), its data on the mesh (``data``), its
checkpoints and their host state (``checkpoints``, ``state``), and its exports (``export``)."""
