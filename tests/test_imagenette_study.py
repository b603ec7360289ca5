"""scripts/imagenette_study.py: which runs it does, on which machine, and rows that say which machine made them."""

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
