"""timm-nam's models: every module of this package not named with a leading underscore is a model file, imported
here so that its ``@register_model`` entrypoints reach timm's registry."""

import importlib
import pkgutil

from ._attn import BLOCK_KINDS, NAM_KINDS, create_attn
from ._placement import NAMPlacementError, insert_nam, model_name, nam_sites

MODEL_MODULES = tuple(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
for _module in MODEL_MODULES:
    importlib.import_module(f'.{_module}', __name__)
