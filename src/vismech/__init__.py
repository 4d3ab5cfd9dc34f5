"""vismech: find, measure and edit the position-ID binding mechanisms of vision-language models.

Layers, each knowing only the ones before it: ``scenes`` (stimuli, no torch) -> ``models`` (adapters) ->
``hooks`` (capture / replace / add) -> ``analysis`` (numbers from arrays) -> ``experiments`` -> ``report``.
"""

__version__ = "0.1.0"
