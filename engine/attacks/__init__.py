"""The attacks, one module per mode.

Each is a callable ``attack(x, generator) -> (objective, loss)`` over the
padded model-input image x in [-1, 1]: PGD steps along the sign of the
objective's gradient, accumulated with momentum (up if ``attack.maximize``, else down), and ``loss`` is
the figure reported to the progress callback.
"""

from fixative.engine.attacks.advdm import AdvDM
from fixative.engine.attacks.encoder import EncoderAttack
from fixative.engine.attacks.mist import Mist
from fixative.engine.attacks.sds import SDS

ATTACKS = {"advdm": AdvDM, "mist": Mist, "sds": SDS, "encoder": EncoderAttack}
