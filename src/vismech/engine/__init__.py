"""The engine: everything that runs a loaded VLM and reads or edits its internals.

``hooks`` captures, replaces and adds to per-head outputs, queries, keys and the residual stream; ``activations``
captures them over many trials; ``patching`` stacks patched heads as rows of one forward (the CMA sweep);
``interventions`` writes values into heads at chosen positions and scores the answers; ``decode`` generates
greedily from captured language-model inputs (many settings of a batch, one vision pass); ``edits`` holds the
last-token head edits of the reuse, relative/absolute and binding-error experiments; ``evaluate`` scores the
model's answers to trials; ``attribution`` is the gradient approximation of head patching. It imports
``scenes``, ``analysis`` and ``models``, never ``experiments`` or anything above.
"""
