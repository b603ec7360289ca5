"""scripts/imagenette_study.py: each row says which machine made it (rows from a CPU and a GPU share one table)."""
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
