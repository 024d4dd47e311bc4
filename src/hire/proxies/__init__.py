"""Cheap estimators of W @ x for every row of W ("proxies"), each reporting the bytes it reads.

Every proxy has ``scores(x)`` for all rows, ``scores_rows(x, idx)`` for a subset of rows (so a
cascade can refine survivors), ``nbytes(rows)`` for the bytes it reads per token, and
``state_dict()``/``from_state()`` for saving.
"""

from hire.proxies.exact import ExactProxy
from hire.proxies.lowrank import LowRankProxy
from hire.proxies.quantized import QuantizedProxy
from hire.proxies.quantized_matrix import QuantizedMatrix
from hire.proxies.cascade import Cascade

__all__ = ["ExactProxy", "LowRankProxy", "QuantizedMatrix", "QuantizedProxy", "Cascade"]
