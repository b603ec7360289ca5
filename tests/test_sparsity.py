"""timm-nam sparsity: per-layer statistics of NAM scales read back from a checkpoint."""

import json
import subprocess
import sys

import pytest
import timm
import torch

from timm_nam.sparsity import scale_stats
from timm_nam.training.checkpoint import save_weights


def test_scale_stats_counts_and_fractions():
    model = timm.create_model('resnet50_cifar_nam_sp')
    with torch.no_grad():
        first = model.layer1[0].se.bn.weight
        first.copy_(torch.linspace(0, 1, first.numel()))  # 1024 values in [0, 1]
    rows = scale_stats(model, thresholds=(0.25, 0.5))
    assert len(rows) == 16 and all(r['kind'] == 'pixel λ' for r in rows)
    row = rows[0]
    assert row['layer'] == 'layer1.0.se' and row['n'] == 1024
    expected = (torch.linspace(0, 1, 1024) < 0.25).float().mean().item()
    assert row['frac<0.25'] == pytest.approx(expected)
    assert row['min'] == 0.0 and row['max'] == 1.0
    assert rows[1]['frac<0.5'] == 0.0  # untouched layers: all scales 1
    with pytest.raises(ValueError, match='has no NAM layers'):
        scale_stats(timm.create_model('resnet50_cifar'))


@pytest.mark.parametrize('given', ['file', 'run directory'])
def test_sparsity_cli_reads_checkpoint_and_draws(tmp_path, given):
    model = timm.create_model('mobilenetv2_100_nam_chsp', img_size=64, num_classes=10)
    with torch.no_grad():
        model.blocks[0][0].bn2.act.channel.bn.weight.zero_()
    ckpt = tmp_path / 'last.safetensors'
    save_weights(model, ckpt, 'mobilenetv2_100_nam_chsp', dict(img_size=64, num_classes=10))
    # the run directory stands for its last.safetensors, as for timm-nam train --resume
    target = ckpt if given == 'file' else tmp_path
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'sparsity', str(target)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert f'mobilenetv2_100_nam_chsp from {ckpt}: |scale| of every NAM layer' in proc.stdout
    assert '| blocks.0.0.bn2.act.channel | channel γ | 16 | 0 |' in proc.stdout
    rows = json.loads((tmp_path / 'sparsity.json').read_text())
    assert len(rows) == 34 and rows[0]['frac<0.001'] == 1.0
    png = (tmp_path / 'sparsity.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def test_sparsity_cli_names_what_is_missing(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'sparsity', str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f'No checkpoint in {tmp_path}: expected {tmp_path / "last.safetensors"}' in proc.stderr
