"""Data room: CALVIN format (``calvin``), teacher feature store (``store``), motion masks (``motion``),
CLIP tokenizer (``tokenizer``) and the Grain input pipeline (``pipeline``). Numpy and Grain only: no models.
"""

from dreamvla_jax.data.errors import DataError

__all__ = ['DataError']
