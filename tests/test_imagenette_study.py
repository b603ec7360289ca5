"""lab/imagenette_study.py: which runs it does, on which machine, and rows that say which machine made them."""

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script


@pytest.fixture(scope='module')
def study():
    return load_script('imagenette_study')


def test_cpu_rows_name_the_processor(study):
    assert study.device_label('cpu') == f'cpu ({study.host_cpu()})'
    assert study.host_cpu()


def test_gpu_rows_name_the_gpu(study, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H200')
    assert study.device_label('cuda:0') == 'cuda:0 (NVIDIA H200)'


def test_committed_rows_are_recognized_as_done(study):
    # rows are matched by their recipe string: a change to a family's args would silently re-run the whole study
    done = study.done_runs(Path(study.__file__).parents[1] / 'results/imagenette_study/runs.csv')
    made = {m for m, _, _ in done}
    for family in study.FAMILIES:  # the GPU family too: its rows take a GPU to remake
        # every registered model, and every variant (name:kwargs) once it has rows
        models = [m for m in study.FAMILIES[family]['models'] if ':' not in m or m in made]
        assert {(m, 0, study.recipe_string(family)) for m in models} <= done


def test_a_variant_is_a_model_name_with_kwargs(study):
    assert study.split_spec('resnet18_nam') == ('resnet18_nam', {})
    assert study.split_spec('resnet18_nam:nam_weighting=mean,nam_grad_through_weights=True') == (
        'resnet18_nam',
        {'nam_weighting': 'mean', 'nam_grad_through_weights': True},
    )


def test_gpu_family_runs_only_when_named_and_only_on_a_gpu(study, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    argv = ['imagenette_study.py', '--data-dir', str(tmp_path), '--csv', str(tmp_path / 'runs.csv')]
    monkeypatch.setattr(sys, 'argv', argv + ['--list'])
    study.main()
    assert 'resnet50_cifar' not in capsys.readouterr().out  # not in the default (CPU) families
    monkeypatch.setattr(sys, 'argv', argv + ['--family', 'resnet50_cifar', '--seeds', '0'])
    with pytest.raises(SystemExit):
        study.main()
    assert "--family ['resnet50_cifar'] is sized for a GPU" in capsys.readouterr().err
    assert not (tmp_path / 'runs.csv').exists()


def test_gpu_study_packs_decodes_and_trains_a_row_on_the_cpu(tmp_path):
    """The GPU study's pipeline end to end at toy size on the CPU: pack, decode, augment, train, append a row."""
    import csv
    import json

    from tests.helpers import make_image_folder

    gpu_study = load_script('gpu_study')
    root = make_image_folder(tmp_path / 'data', classes=2, per_class=4, size=40)
    shards = gpu_study.pack(root, tmp_path / 'data128.tar', shard_mb=0.05)
    assert len(shards) > 1 and all(s.stat().st_size < 0.06e6 for s in shards)
    data, num_classes = gpu_study.load(shards, torch.device('cpu'))
    assert num_classes == 2 and data['train'][0].shape == (8, 3, 128, 128) and data['train'][0].dtype == torch.uint8
    crops = gpu_study.augment(data['train'][0], torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, 128, 128)
    runs = tmp_path / 'runs.csv'
    argv = ['run', *map(str, shards), '--csv', str(runs), '--runs-dir', str(tmp_path / 'runs'), '--device', 'cpu']
    argv += ['--epochs', '1', '--batch-size', '4', '--families', 'resnet18', '--seeds', '0']
    argv += ['--models', 'resnet18_nam:nam_weighting=mean']
    gpu_study.main(argv)
    (row,) = list(csv.DictReader(open(runs)))
    assert row['model'] == 'resnet18_nam:nam_weighting=mean' and row['family'] == 'resnet18_128'
    assert 0 <= float(row['top1']) <= 100 and float(row['penalty_p']) == 1e-4
    # trained by the study trainer: its run directory, whose metrics the row reports
    (run,) = (tmp_path / 'runs').iterdir()
    assert {'last.safetensors', 'last_state.pt', 'args.json'} <= {f.name for f in run.iterdir()}
    (metrics,) = json.loads((run / 'metrics.json').read_text())
    assert float(row['top1']) == round(metrics['val_top1'], 3)
    gpu_study.main(argv)  # done: neither trained nor written again
    assert len(list(csv.DictReader(open(runs)))) == 1
