"""How far two runs of one computation in one floating-point format can be apart: the tolerance
the tests derive from the arithmetic (unit roundoff × the additions whose order may change × the
steps × the size of the value), never from the differences one machine showed.

Used by tests/integration/test_ddp.py (two float32 ranks against one float32 process, u = EPS32)
and tests/model/test_td_reference.py (our TD training loop against the TiDAL reference's numbers,
both run in float64, u = EPS64). Each names its format where it binds `u`; the derivation is one.
Imported as `tests.rounding`, as the tests import each other (pytest runs from the repository root).
"""
from __future__ import annotations

# Unit roundoff: one rounding to nearest moves a value by at most this fraction of it.
EPS32 = 2.0 ** -24  # float32 (24-bit significand)
EPS64 = 2.0 ** -53  # float64 (53-bit significand)


def rounding_bound(magnitude: float, steps: int, terms: int, stored: float = 0.0, *, u: float) -> float:
    """The most two runs of one smooth training computation, both in the floating-point format
    of unit roundoff `u`, can differ by, when `terms` additions per step are done in another
    order (test_ddp's reordered_terms, test_td_reference's chain_terms), after `steps` optimizer
    steps, for a value of size `magnitude`; for a parameter, `stored` is its largest |value|.

    Derivation. (1) A sum of K terms, in any order, is within (K-1)·u·Σ|x_i| of the exact sum
    (Higham, Accuracy and Stability of Numerical Algorithms, §4.2): two orders differ by less
    than 2·K·u·Σ|x_i|, a relative 2·K·u of the sum (its terms mostly of one sign: Σ|x_i| ≈
    |Σ x_i|; where they are not, Σ|x_i| is the `magnitude`). (2) Relative differences along a
    chain of such sums add, to first order: a value at the end of a chain of `terms` additions
    (a parameter's gradient, and so its update; a logit) differs by a relative 2·u·terms at most.
    (3) SGD's update of a tensor at step t is exactly lr_t × its momentum buffer, so step t's
    differences move it by at most 2·u·terms·lr_t·max|buffer_t|, and all steps' by
    2·u·terms·path, path = Σ_t lr_t·max|buffer_t| (ddp_worker's `travelled`). (4) A difference
    made at one step is passed on through every later step's computation, to first order and in
    a stable run without growing: counted `steps` times, 2·u·terms·steps·path. (5) The parameter
    is stored in its format after every step: once the updates differ at all, the two runs may
    round it to neighbouring floats, 2·u·|θ| apart, at each step: 2·u·steps·stored more. Values
    computed from the parameters (losses, probabilities, logits) take their own size as
    `magnitude`, or Σ|x_i| of their last sum where its terms cancel. For small-cnn with
    BatchNorm in float32, batch 32 of 8×8 images, 6 steps: 2·u·terms·steps = 2·2^-24·14·2048·6
    = 2.1e-2 (of the path length); without BatchNorm 2.9e-3.

    First order and smooth: at a kink (ReLU at 0, a max-pool near-tie) rounding can pick the
    other branch and move the results by far more; see ddp_worker's docstring, and
    test_td_reference's for how often that can happen in float64.
    """
    return 2 * u * steps * (terms * magnitude + stored)
