"""Build hook: install ``timm_nam_autoload.pth`` beside ``_timm_nam_autoload.py`` in site-packages.

The .pth line makes timm load ``timm.plugins`` entry points when it is imported (see
``_timm_nam_autoload.py``). It is generated here, for regular and editable wheels alike, rather than
kept in git.
"""

import os
import tempfile

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_NAME = 'timm_nam_autoload.pth'
PTH_LINE = 'import _timm_nam_autoload; _timm_nam_autoload.install()\n'


class AutoloadPthHook(BuildHookInterface):
    PLUGIN_NAME = 'custom'

    def initialize(self, version, build_data):
        self._tmpdir = tempfile.mkdtemp(prefix='timm_nam_build_')
        pth = os.path.join(self._tmpdir, PTH_NAME)
        with open(pth, 'w') as f:
            f.write(PTH_LINE)
        build_data['force_include'][pth] = PTH_NAME
        build_data['force_include'][os.path.join(self.root, '_timm_nam_autoload.py')] = '_timm_nam_autoload.py'
