"""vqcompress: make neural networks many times smaller through codebooks, and run them.

    import vqcompress as vqc
    model = vqc.compress(model, method="kmeans", bits=2)
    vqc.save(model, "m.vqc"); model = vqc.load("m.vqc", like=skeleton)
    print(vqc.report(model))
"""

__version__ = "0.1.0"

from .coded import CodedWeight, CodeLayout  # noqa: E402
from .compress import compress  # noqa: E402
from .errors import VQCError  # noqa: E402
from .io import load, save  # noqa: E402
from .layers import set_forward_path  # noqa: E402
from .plan import Plan  # noqa: E402
from .report import report  # noqa: E402

__all__ = ["CodedWeight", "CodeLayout", "Plan", "VQCError", "compress", "load", "report", "save", "set_forward_path", "__version__"]
