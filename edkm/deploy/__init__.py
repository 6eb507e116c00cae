"""Deployment: Core ML export with edkm's exact LUTs, text generation, HF-style folders.

``coreml`` (`export_coreml`; needs the ``coreml`` extra), ``mlpackage`` (read a package
back without Core ML), ``generate`` (greedy / sampled streaming generation), ``folder``
(``save_pretrained``-style folder: config + tokenizer + edkm safetensors).
"""

from edkm.deploy.coreml import export_coreml
from edkm.deploy.folder import load_folder, save_folder
from edkm.deploy.generate import Generation, generate

__all__ = ["Generation", "export_coreml", "generate", "load_folder", "save_folder"]
