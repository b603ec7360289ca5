"""Load timm plugins, declared as ``timm.plugins`` entry points, right after ``timm`` is imported.

timm reads no entry points, so a model registered by a plugin exists only once the plugin module is
imported. This module is imported at interpreter start by ``timm_nam_autoload.pth`` (installed with
timm-nam): it only puts a finder at the front of ``sys.meta_path`` that waits for ``import timm``.
Interpreters that never import timm pay one string comparison per import. When timm is imported,
every entry point of the group is loaded after timm's own ``__init__`` has run. Any package can join
the group in its metadata::

    [project.entry-points."timm.plugins"]
    my_models = "my_package.models"

Set ``TIMM_DISABLE_PLUGINS=1`` to switch this off (then ``import timm_nam`` registers the models).
"""

import os
import sys

GROUP = 'timm.plugins'
ENV_DISABLE = 'TIMM_DISABLE_PLUGINS'


def plugins_disabled() -> bool:
    return os.environ.get(ENV_DISABLE, '').strip().lower() not in ('', '0', 'false', 'no')


def _initializing(module_name: str) -> bool:
    """True while ``module_name``'s top-level package is half-imported (its own import reached timm)."""
    module = sys.modules.get(module_name.split('.')[0])
    return module is not None and getattr(getattr(module, '__spec__', None), '_initializing', False)


def load_plugins() -> list:
    """Import every ``timm.plugins`` entry point; returns the names loaded. Failures warn, never raise."""
    if plugins_disabled():
        return []
    import warnings
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=GROUP):
        if _initializing(ep.module):
            continue  # that package is being imported right now and registers itself
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as e:  # a broken plugin must not break `import timm`
            warnings.warn(f'timm plugin {ep.name!r} ({ep.value}) failed to load: {e!r}', RuntimeWarning, stacklevel=2)
    return loaded


class _LoadPluginsAfter:
    """Wraps timm's loader: run it, then load the plugins. Everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        load_plugins()


class TimmPluginFinder:
    """One-shot meta path finder for ``timm``: it defers to the other finders and wraps the loader."""

    timm_plugin_finder = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        self.uninstall()
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and not plugins_disabled():
                    spec.loader = _LoadPluginsAfter(spec.loader)
                return spec
        return None

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Called from the .pth file; a no-op if disabled, if timm is already imported or already installed."""
    if plugins_disabled() or 'timm' in sys.modules:
        return
    if any(getattr(f, 'timm_plugin_finder', False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, TimmPluginFinder())
