"""vqcompress: make neural networks many times smaller through codebooks, and run them.

    import vqcompress as vqc
    model = vqc.compress(model, method="kmeans", bits=2)
    model = vqc.compress(model, vqc.JLCMConfig(steps=20), vqc.ModelAverage(2.1), calibration=[x1, x2])
    vqc.save(model, "m.vqc"); model = vqc.load("m.vqc", like=skeleton)
    print(vqc.report(model))
"""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting (faiss's and torch's default) slow k-means several-fold
# when the cores are shared; passive waiting costs nothing on an idle machine. Only takes effect
# when set before torch and faiss start, as in the ``vqc`` command; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The harness plugs into the core here: the bundled networks and the zoo say how to rebuild their
# models (``source.SKELETONS``), the installed corpora register their names (``text.CORPORA``).
from . import data, models  # noqa: E402, F401
from .budget import ModelAverage, PerLayer  # noqa: E402
from .coded import CodedWeight, CodeLayout  # noqa: E402
from .compress import compress  # noqa: E402
from .errors import VQCError  # noqa: E402
from .io import load, save  # noqa: E402
from .layers import set_forward_path  # noqa: E402
from .methods.jlcm import JLCMConfig  # noqa: E402
from .methods.kmeans import KMeansConfig  # noqa: E402
from .methods.qswd import QSWDConfig  # noqa: E402
from .methods.rtn import RTNConfig  # noqa: E402
from .methods.vq4all import VQ4AllConfig  # noqa: E402
from .methods.vqdnn import VQDNNConfig  # noqa: E402
from .plan import Plan  # noqa: E402
from .report import report  # noqa: E402

__all__ = ["CodeLayout", "CodedWeight", "JLCMConfig", "KMeansConfig", "ModelAverage", "PerLayer", "Plan", "QSWDConfig",
           "RTNConfig", "VQ4AllConfig", "VQCError", "VQDNNConfig", "__version__", "compress", "load", "report", "save",
           "set_forward_path"]
