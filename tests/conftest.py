import os

# Every test is offline: nothing may reach the Hugging Face Hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
