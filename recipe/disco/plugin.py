"""verl plugin entry point (group ``verl.plugins``): ``import verl`` imports this in every process.

It registers the ``disco`` advantage estimator and policy loss, and activates the CPU backend for
tests and the demo when asked (``DISCO_CPU_BACKEND=1``).
"""

from recipe.disco import estimator, loss  # noqa: F401  (registration side effects)
from recipe.disco.cpu import maybe_activate

maybe_activate()
