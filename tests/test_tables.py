"""The main job: the paper's tables, and the FLOP convention behind them."""

import subprocess
import sys

import torch.nn as nn

from tests.helpers import PAPER_PARAMS
from timm_nam.flops import count_flops
from timm_nam.tables import TABLE1, TABLE2, measure_rows, overhead_rows, render_tables


def test_flop_convention_on_a_known_network():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    count = count_flops(model, (3, 16, 16))
    assert count.macs == 8 * 3 * 9 * 16 * 16 + 8 * 5
    assert count.norm_ops == 2 * 8 * 16 * 16
    assert count.paper_flops == count.macs + count.norm_ops
    assert model.training  # restored


def test_every_paper_row_matches():
    rows = measure_rows(TABLE1 + TABLE2)
    for m in rows:
        row = m['row']
        # exact counts: a 0.01M tolerance on the paper's rounded values would also accept the bare network
        assert m['params'] == PAPER_PARAMS[row.model], row.label
        if row.params_m is not None:  # and within the paper's two decimals (it rounds 3,504,872 to 3.51M)
            assert m['params_ok'] and m['flops_ok'], row.label
    by_model = {m['row'].model: m for m in rows}
    # conv + linear multiply-adds of the bare networks: 1.298 G and 0.301 G; NAM adds no multiply-adds
    assert round(by_model['resnet50_cifar']['macs'] / 1e9, 3) == 1.298
    assert round(by_model['mobilenetv2_100']['macs'] / 1e9, 3) == 0.301
    assert by_model['resnet50_cifar_nam']['macs'] == by_model['resnet50_cifar']['macs']
    assert by_model['mobilenetv2_100_nam']['macs'] == by_model['mobilenetv2_100']['macs']
    # the batch norms NAM adds are what moves its FLOPs to the paper's 1.31 G and 0.32 G
    assert round(by_model['resnet50_cifar_nam']['paper_flops'] / 1e9, 2) == 1.31
    assert round(by_model['mobilenetv2_100_nam']['paper_flops'] / 1e9, 2) == 0.32


def test_appendix_overheads_equal_the_paper():
    rows = overhead_rows()
    assert [r['stage'] for r in rows] == ['layer1', 'layer2', 'layer3', 'layer4']
    for r in rows:  # every stage, not only the totals
        for kind in ('cbam_channel', 'nam_channel', 'cbam_spatial', 'nam_spatial'):
            assert r[kind] == r[f'paper_{kind}'], (r['stage'], kind)
    assert [r['nam_channel'] for r in rows] == [256, 512, 1024, 2048]
    assert [r['nam_spatial'] for r in rows] == [1024, 256, 64, 16]
    text = render_tables(measure_rows(TABLE1[:1]), measure_rows(TABLE2[:1]), rows)
    assert '| Overhead | 696,320 | 696,320 | 3,840 | 3,840 | 392 | 392 | 1,360 | 1,360 |' in text


def test_cli_default_command_prints_every_row():
    proc = subprocess.run([sys.executable, '-m', 'timm_nam'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for row in TABLE1 + TABLE2:
        assert f'`{row.model}`' in proc.stdout
    assert '| ResNet 50 + NAM(ch) | `resnet50_cifar_nam` | 23.74M | 23.735M (23,735,460) | 1.31G |' in proc.stdout
    verdicts = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) == 8 and cells[1].startswith('`'):
            verdicts[cells[1].strip('`')] = cells[-1]
    assert set(verdicts) == {row.model for row in TABLE1 + TABLE2}
    for row in TABLE1 + TABLE2:
        if row.params_m is not None:
            assert verdicts[row.model].startswith('yes'), (row.model, verdicts[row.model])
