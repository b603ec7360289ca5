"""README.md's examples run as written: every python block is executed (offline: the Hub repositories its
``pretrained=True`` lines read are laid out in a Hugging Face cache, with random weights of the right networks), every
timm-nam command line parses."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import hf_cache_snapshot, offline_hub_env
from timm_nam.cli import build_parser

README = Path(__file__).parents[1] / 'README.md'
BLOCKS = re.findall(r'```(\w+)\n(.*?)```', README.read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == 'python']
SHELL = [code for lang, code in BLOCKS if lang == 'bash']


def test_the_readme_starts_with_the_setup_and_test_commands():
    assert SHELL[0].strip().startswith('python3 -m venv .venv') and SHELL[0].strip().endswith('&& timm-nam')
    assert SHELL[1].strip() == 'python -m pytest -q'
    ci = (README.parent / '.ci/run').read_text()
    assert '\npython -m pytest -q\n' in ci  # CI runs exactly the README's test command


def _offline_hub(code: str, root: Path) -> dict:
    """An environment in which the ``timm.create_model('<name>', pretrained=True)`` calls of ``code`` find the
    repositories they read in an offline Hugging Face cache (random weights of the network each repository holds)."""
    import timm
    from safetensors.torch import save_file

    cache = root / 'hf_cache'
    for name in re.findall(r"create_model\('([\w.]+)', pretrained=True", code):
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        snapshot = hf_cache_snapshot(cache, repo)
        if (snapshot / 'model.safetensors').exists():
            continue
        arch = repo.split('/', 1)[1].split('.')[0]  # the plain network a plain_* tag converts, or the model itself
        save_file(timm.create_model(arch).state_dict(), str(snapshot / 'model.safetensors'))
    return offline_hub_env(cache)


@pytest.mark.parametrize('code', PYTHON, ids=[f'python_block_{i}' for i in range(len(PYTHON))])
def test_python_block_runs(code, tmp_path):
    env = _offline_hub(code, tmp_path)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _timm_nam_commands():
    for block in SHELL[2:]:
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split('#')[0].strip()
            if line.startswith('timm-nam '):
                yield shlex.split(line)[1:]


@pytest.mark.parametrize('argv', list(_timm_nam_commands()), ids=lambda argv: argv[0])
def test_timm_nam_command_lines_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_every_python_block_and_command_is_covered():
    assert len(PYTHON) >= 3 and len(list(_timm_nam_commands())) >= 3
