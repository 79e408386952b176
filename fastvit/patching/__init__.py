"""Model surgery: swap fused modules into existing timm, torchvision and Hugging Face ViTs.

``fastvit.patch(model)`` / ``fastvit.unpatch(model)`` live in ``api``; the report type in
``report``; the family adapters (``timm``, ``torchvision``, ``transformers``) and what they find in
``registry``. No model library is imported until a model from it is patched.
"""

from fastvit.patching.api import patch, unpatch
from fastvit.patching.report import PatchEntry, PatchReport

__all__ = ["PatchEntry", "PatchReport", "patch", "unpatch"]
