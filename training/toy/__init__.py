"""2D guidance benchmark with known ground truth: ``python -m training.toy --out DIR`` (see docs/toy-benchmark.md).

Modules: ``problem`` (the ring mixture and its exact denoiser, the training backend), ``samplers`` (every method as one
DDIM loop), ``train`` (annealing with Algorithm 1 of ``training.algorithm``), ``learn_to_guide``, ``metrics``,
``benchmark`` (the run, with the step-count study), ``report`` (tables and plots) and ``checked_docs`` (generates the
docs' blocks from committed results and checks every claim against them: ``python -m training.toy.checked_docs``).
"""

from .problem import ExactRingDenoiser, RingProblem

__all__ = ["ExactRingDenoiser", "RingProblem"]
