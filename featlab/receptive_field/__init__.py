"""Receptive-field arithmetic on a traced graph: one rule per layer type, a status, never a guess.

For every node of a ``torch.fx`` graph, :func:`graph_receptive_fields` computes per spatial axis
the theoretical receptive field ``size`` r, the effective stride ``jump`` S and the effective
padding P, with the closed forms of Araujo et al. (Distill 2019) applied layer by layer:
``r += (d(k-1)+1 - 1) * S``, ``P += p * S``, ``S *= s``. Unit ``u`` of a feature map then sees
input pixels ``[u*S - P, u*S - P + r - 1]``. One rule per layer type (``_MODULE_RULES``,
``_FUNCTION_RULES``, ``_METHOD_RULES`` in :mod:`~featlab.receptive_field.arithmetic`, filled by
:mod:`~featlab.receptive_field.rules`).

Choices a user should know:

* Branches that merge (add, mul, cat) must share the stride; the merged field is the *union* of
  the branches' fields, which equals the max over branches when their centres align (ResNets,
  DenseNets). When centres differ the status says so.
* Global context (a squeeze-excitation gate, a GroupNorm, a global pool feeding back) makes every
  output depend on every input pixel. featlab reports the LOCAL receptive field of the
  convolutional path as the size, and says in the status that global context reaches the point,
  e.g. ``"exact; global context via SE at features.1.0.block.1"``: the local field is what
  spatial detail a unit aggregates, the gate only rescales channels.
* Batch norm is a per-channel affine map in eval mode (the mode featlab traces in).
* An op without a rule gives status ``"unknown: <op> at <where>"`` and no numbers downstream.

:func:`gradient_receptive_field` (:mod:`~featlab.receptive_field.gradient`) measures the field
empirically on a linearised positive copy of the model (gradient support of the centre unit), as a
cross-check of the arithmetic.

Examples:
    >>> RFAxis().conv(3, padding=1).conv(3, dilation=2, padding=2)
    RFAxis(size=7, jump=1, start=-3)
"""

from __future__ import annotations

from featlab.receptive_field.arithmetic import ReceptiveField, RFAxis, graph_receptive_fields

# The rules register themselves in arithmetic's tables when imported. This __init__ runs before
# any submodule can be used (importing featlab.receptive_field.arithmetic runs it first), so the
# tables are full before anyone can call graph_receptive_fields. Arithmetic itself does not import
# rules: rules import arithmetic, and the cycle would hinge on the order of definitions.
from featlab.receptive_field import rules  # noqa: F401  (imported for its registrations)
from featlab.receptive_field.gradient import EmpiricalRF, gradient_receptive_field

__all__ = ["RFAxis", "ReceptiveField", "EmpiricalRF", "graph_receptive_fields",
           "gradient_receptive_field"]
