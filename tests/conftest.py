import gc
import os

# Every test is offline: nothing may reach the Hugging Face Hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest
import torch
import torch.jit._builtins


def _keep_torchscript_builtins_alive():
    """Work around a PyTorch bug that made `torch.jit.script` fail at random in this suite.

    TorchScript recognises builtin ops by `id()` (`torch.jit._builtins._builtin_table`), but torch drops
    some registered op objects without removing their ids: `torch._ops._refresh_packet` (run when a
    namespace gains an overload, e.g. on the first `torch.compile`) and library teardown. A later object
    allocated at a freed address, such as a Conv2d's `_reversed_padding_repeated_twice` tuple, is then
    taken for a builtin and scripting stops with "builtin cannot be used as a value". Keeping every
    registered object alive for the session means no other object can take its address.
    """
    registered = [o._op for o in gc.get_objects() if isinstance(o, torch._ops.OpOverloadPacket)]
    register_builtin = torch.jit._builtins._register_builtin

    def register_and_keep_alive(fn, op):
        registered.append(fn)
        register_builtin(fn, op)

    torch.jit._builtins._register_builtin = register_and_keep_alive


_keep_torchscript_builtins_alive()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
