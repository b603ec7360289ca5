"""timm-nam sparsity: per-layer statistics of NAM scales read back from a train.py run."""

import json
import subprocess
import sys

import pytest
import timm
import torch

from tests.helpers import write_train_py_run
from timm_nam.sparsity import scale_stats


def test_scale_stats_counts_and_fractions():
    model = timm.create_model('resnet50_cifar_nam_sp')
    with torch.no_grad():
        first = model.layer1[0].bn3.nam.bn.weight
        first.copy_(torch.linspace(0, 1, first.numel()))  # 1024 values in [0, 1]
    rows = scale_stats(model, thresholds=(0.25, 0.5))
    assert len(rows) == 16 and all(r['kind'] == 'pixel λ' for r in rows)
    row = rows[0]
    assert row['layer'] == 'layer1.0.bn3.nam' and row['n'] == 1024
    expected = (torch.linspace(0, 1, 1024) < 0.25).float().mean().item()
    assert row['frac<0.25'] == pytest.approx(expected)
    assert row['min'] == 0.0 and row['max'] == 1.0
    assert rows[1]['frac<0.5'] == 0.0  # untouched layers: all scales 1
    with pytest.raises(ValueError, match='has no NAM layers'):
        scale_stats(timm.create_model('resnet50_cifar'))


@pytest.mark.parametrize('given', ['checkpoint', 'run directory'])
def test_sparsity_cli_reads_a_train_py_run_and_draws(tmp_path, given):
    model = timm.create_model('mobilenetv2_100_nam_chsp', img_size=64, num_classes=10)
    with torch.no_grad():
        model.blocks[0][0].bn2.nam.channel.bn.weight.zero_()
    args = dict(model='mobilenetv2_100_nam_chsp', num_classes=10, img_size=64, model_kwargs={'nam_penalty': 1e-3})
    run = write_train_py_run(tmp_path / 'run', model, args, [20.0, 30.0])
    # the run directory stands for its model_best.pth.tar, as for timm-nam export
    target = run / 'last.pth.tar' if given == 'checkpoint' else run
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'sparsity', str(target)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    expected = run / ('last.pth.tar' if given == 'checkpoint' else 'model_best.pth.tar')
    assert f'mobilenetv2_100_nam_chsp from {expected}: |scale| of every NAM layer' in proc.stdout
    assert '| blocks.0.0.bn2.nam.channel | channel γ | 16 | 0 |' in proc.stdout
    rows = json.loads((run / 'sparsity.json').read_text())
    assert len(rows) == 34 and rows[0]['frac<0.001'] == 1.0
    png = (run / 'sparsity.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def test_sparsity_cli_names_what_is_missing(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'sparsity', str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f"Not the output directory of timm's train.py: args.yaml, summary.csv missing in {tmp_path}" in proc.stderr
