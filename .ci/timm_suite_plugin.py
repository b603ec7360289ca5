"""pytest plugin: run timm's own tests/test_models.py on the models timm-nam registers.

timm parametrizes its model tests over every registered model; this keeps the items whose ``model_name`` is one of
ours (an entrypoint defined in ``timm_nam``) and drops the rest, together with the tests that download weights.
"""

import timm
from timm.models import model_entrypoint

# these load pretrained weights from the Hub; the suite runs offline
NETWORK_TESTS = {'test_model_load_pretrained', 'test_model_features_pretrained'}


def _ours():
    return {name for name in timm.list_models() if model_entrypoint(name).__module__.startswith('timm_nam.')}


def pytest_collection_modifyitems(config, items):
    ours = _ours()
    if not ours:
        raise RuntimeError('no timm_nam models are registered: is timm-nam installed in this environment?')
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = getattr(item, 'originalname', item.name)
        (keep if params.get('model_name') in ours and name not in NETWORK_TESTS else drop).append(item)
    covered = {item.callspec.params['model_name'] for item in keep}
    missing = sorted(ours - covered)
    if missing:
        raise RuntimeError(f"timm's test_models.py collected no test for: {', '.join(missing)}")
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
