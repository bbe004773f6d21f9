"""The attacks, one module per mode.

Each is a callable ``attack(x, generators) -> (objective, loss)`` over a batch
of padded model-input images x (N, 3, H, W) in [-1, 1], one generator per row:
PGD steps along the sign of the objective's gradient, accumulated with momentum
(up if ``attack.maximize``, else down), and ``loss`` is the figure reported to
the progress callback. Both hold one value per row, and a row's objective
depends on that row alone (``fixative.engine.pgd.run_pgd`` differentiates their sum).
``input_shape`` is one row's shape, (1, 3, H, W).
"""

from fixative.engine.attacks.advdm import AdvDM
from fixative.engine.attacks.encoder import EncoderAttack
from fixative.engine.attacks.mist import Mist
from fixative.engine.attacks.sds import SDS

ATTACKS = {"advdm": AdvDM, "mist": Mist, "sds": SDS, "encoder": EncoderAttack}
