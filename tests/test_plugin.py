"""Discovery: after installation, `import timm` alone registers the models (timm.plugins entry points)."""

import os
import subprocess
import sys
from importlib import metadata

import pytest

import _timm_nam_autoload as autoload


def _installed() -> bool:
    try:
        eps = metadata.entry_points(group=autoload.GROUP)
    except Exception:
        return False
    return any(ep.name == 'timm_nam' for ep in eps)


pytestmark = pytest.mark.skipif(not _installed(), reason='timm-nam is not pip-installed (pip install -e .)')


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != autoload.ENV_DISABLE}
    full_env.update(env)
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_timm_alone_registers_models():
    proc = _run(
        'import sys, timm\n'
        "m = timm.create_model('resnet50_nam')\n"
        "print(sum(type(x).__name__ == 'NAMChannel' for x in m.modules()))\n"
        "print(sorted(timm.list_models('*nam*')))\n"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == '16'  # timm's ResNet-50, a NAM gate in every block
    assert "'mobilenetv2_nam'" in lines[1] and "'resnet50_nam'" in lines[1]


def test_from_timm_models_import_also_registers():
    proc = _run("from timm.models import create_model, is_model\nprint(is_model('mobilenetv2_nam'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'True'


def test_import_timm_nam_first_still_works():
    # the loader reports a plugin that fails to load with a RuntimeWarning: make that an error
    proc = _run(
        "import timm_nam, timm\nprint(len(timm.list_models('*nam*')) > 10)", PYTHONWARNINGS='error::RuntimeWarning'
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'True'


def test_environment_variable_switches_it_off():
    proc = _run(
        "import timm\nprint(timm.list_models('*nam*'))\nimport timm_nam\nprint(timm.is_model('resnet50_nam'))",
        **{autoload.ENV_DISABLE: '1'},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ['[]', 'True']


def test_interpreters_without_timm_pay_nothing():
    """At startup only the tiny finder is installed: no timm, torch, timm_nam or entry-point scan."""
    proc = _run(
        'import sys\n'
        "heavy = [m for m in ('timm', 'torch', 'timm_nam', 'importlib.metadata') if m in sys.modules]\n"
        'finders = [type(f).__name__ for f in sys.meta_path]\n'
        'print(heavy, finders[0])\n'
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[] TimmPluginFinder'


def test_broken_plugin_warns_instead_of_breaking_timm(monkeypatch):
    class BrokenEntryPoint:
        name, value, module = 'broken', 'no_such_module_xyz', 'no_such_module_xyz'

        def load(self):
            raise ImportError('no_such_module_xyz')

    monkeypatch.setattr(metadata, 'entry_points', lambda group: [BrokenEntryPoint()])
    with pytest.warns(RuntimeWarning, match="timm plugin 'broken'"):
        assert autoload.load_plugins() == []
