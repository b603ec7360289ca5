"""Where NAM goes in a timm network, found from the network itself: after the batch norm that ends each residual
branch, before the residual add.

The network is traced with torch.fx (batch norms, NAM sites and timm's no-trace modules as leaves) and run once on a
zero image to know each tensor's shape. A residual add is a sum of two tensors of one shape, a block's shortcut and
its branch (`_Sums`): the shortcut is the point where the two fork (the block's input) or a projection of it, and the
branch holds more weight layers (convolutions, linear layers). Sums of parallel branches of one input (MobileOne,
RepVGG), hierarchical split sums (Res2Net) and multi-resolution fusion sums (HRNet) are not residual adds. The
branch is walked back through what keeps its values in place (identity, dropout, drop-path, activations, layer scale
and other broadcast scales, an attention gate ``x * g``, a leading channel slice ``x[:, :C]``) to the batch norm it
ends in (a norm-act counts as a norm; its activation then runs behind the gate), or to the norms of the parts it
concatenates (GhostNet).
Inverted-residual blocks without a skip (timm's ``has_skip``) have no add; the paper's MobileNetV2 counts them, so
with ``blocks_without_skip`` their output is walked back alike. `insert_nam` makes each norm a `NormNAM`.
"""

import functools
import itertools
import operator
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_notrace_functions, get_notrace_modules, to_2tuple

from ..layers import NormNAM, norm_nam
from ._attn import NAM_KINDS, SITE_KINDS, create_attn, factory_kwargs

__all__ = ['nam_sites', 'insert_nam', 'NAMPlacementError', 'model_name']
_BatchNorm = nn.modules.batchnorm._BatchNorm

_ADDS = {operator.add, operator.iadd, torch.add, 'add', 'add_'}
_SCALES = {operator.mul, operator.imul, torch.mul, 'mul', 'mul_'} | _ADDS  # broadcast scales and shifts pass
_UNARY = {F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.mish, F.dropout, torch.relu}
_UNARY |= {'relu', 'relu_', 'contiguous', 'clone'}
_IDENTITY_MODULES = ('torch.nn.modules.dropout', 'timm.layers.drop')
_WEIGHT_LAYERS = {F.conv2d, torch.conv2d, F.linear}
_POOLS = {F.avg_pool2d, F.max_pool2d, F.pad}
_PROJECTIONS = (nn.modules.conv._ConvNd, _BatchNorm, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
_PROJECTIONS += (nn.ZeroPad2d, nn.Identity)
_PARALLEL = 'a sum of parallel branches of one input (a MobileOne / RepVGG train-time block)'
_NAMES = {'getitem': 'a slice (getitem)', 'cat': 'a concatenation (cat)', 'add': 'a sum of branches (add)'}
_VALUE_MODULES = ('torch.nn.modules.activation', 'timm.layers.activations')


class NAMPlacementError(ValueError):
    """NAM cannot be placed in this network (it names the network and the reason)."""


def model_name(model: nn.Module) -> str:
    """A timm model's architecture name (its class name where it has no pretrained cfg)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaves = (_BatchNorm, NormNAM, *get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _shaped_graph(model: nn.Module, img_size) -> fx.GraphModule:
    """``model`` traced, each node's output shape recorded for a zero image of ``img_size`` (eval mode, no
    gradients; every module's mode restored)."""
    name = model_name(model)
    try:
        graph = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:
        raise NAMPlacementError(f'Cannot add NAM to {name}: torch.fx cannot trace it ({_first_line(e)})') from None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise NAMPlacementError(f'Cannot add NAM to {name}: it has no 2D convolution')
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            x = first.weight.new_zeros(1, first.in_channels, *to_2tuple(img_size))
            fx.passes.shape_prop.ShapeProp(graph).propagate(x)
    except Exception as e:
        size, why = 'x'.join(map(str, to_2tuple(img_size))), _first_line(e.__cause__ or e)  # ShapeProp wraps it
        raise NAMPlacementError(f'Cannot add NAM to {name}: its traced graph fails on a {size} image ({why})') from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return graph


def _first_line(e: BaseException) -> str:
    return ': '.join([type(e).__name__, *str(e).splitlines()[:1]])  # an assert may have no message


def _shape(arg) -> Optional[torch.Size]:
    meta = arg.meta.get('tensor_meta') if isinstance(arg, fx.Node) and arg.op != 'get_attr' else None
    return getattr(meta, 'shape', None)


def _full_operands(node: fx.Node) -> List[fx.Node]:
    """The operands of an element-wise op that have its output's shape (the others are broadcast into it, or expanded
    to it from a smaller tensor, as ECA's gate is)."""
    shape = _shape(node)
    expanded = [a for a in node.args[:2] if isinstance(a, fx.Node) and _target(a) in ('expand', 'expand_as')]
    return [a for a in node.args[:2] if shape is not None and _shape(a) == shape and a not in expanded]


def _target(node: fx.Node):
    return node.target if node.op in ('call_function', 'call_method') else None


def _step_back(graph: fx.GraphModule, node: fx.Node, through: str = 'values') -> Optional[fx.Node]:
    """The input whose values ``node`` keeps in place, or None where ``node`` computes new ones: ``through='values'``
    passes identity, dropout, drop-path, activations and broadcast scales and gates (``x·γ``, ``x·g``, ``x + β``);
    ``'identity'`` only the first three."""
    if node.op == 'call_module':
        module = graph.get_submodule(node.target)
        kind = type(module).__module__
        passes = isinstance(module, nn.Identity) or kind.startswith(_IDENTITY_MODULES)
        passes |= through == 'values' and kind.startswith(_VALUE_MODULES)
        return node.args[0] if passes and len(node.args) == 1 else None
    if through != 'values':
        return None
    target = _target(node)
    if target in _UNARY:
        return node.args[0]
    full = _full_operands(node) if target in _SCALES else []
    return full[0] if len(full) == 1 else None


def _branch_ends(
    graph: fx.GraphModule, node: fx.Node, through: str = 'values'
) -> List[Tuple[fx.Node, Optional[nn.Module]]]:
    """Walk back from ``node`` (`_step_back`) to the nodes that compute its values, with their modules (None for a
    function): one, or one per part where the branch is a concatenation (or a leading channel slice of one) of
    parts, as GhostNet's is."""
    while True:
        previous = _step_back(graph, node, through) or (_channel_head(node) if through == 'values' else None)
        if previous is None:
            break
        node = previous
    if through == 'values' and _target(node) == torch.cat and _cat_dim(node) == 1:
        return [end for part in node.args[0] for end in _branch_ends(graph, part, through)]
    return [(node, graph.get_submodule(node.target) if node.op == 'call_module' else None)]


def _channel_head(node: fx.Node) -> Optional[fx.Node]:
    """The tensor whose leading channels ``node`` is (``x[:, :C]``, as RexNet's and GhostNet's blocks take them)."""
    if _target(node) != operator.getitem or not isinstance(node.args[1], tuple) or len(node.args[1]) < 2:
        return None
    batch, channels, *rest = node.args[1]
    full = slice(None)
    if batch != full or not isinstance(channels, slice) or channels.start not in (None, 0) or channels.step is not None:
        return None
    return node.args[0] if all(r in (full, Ellipsis) for r in rest) else None


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get('dim', node.args[1] if len(node.args) > 1 else 0)


class _Sums:
    """The sums of a traced network told apart: a residual add is a block's shortcut plus its branch, where the
    shortcut is the point the two fork from (the block's input) or a projection of it (convolutions, norms, pooling
    in a chain: a downsample) and the branch holds more weight layers than the shortcut. Sums of parallel branches of
    one input (the train-time blocks of MobileOne, RepVGG and RepGhost: one-conv branches, an identity norm, or a
    chain of sums from one fork) are not residual blocks; nor are sums whose operands do not fork as a block's do
    (Res2Net's hierarchical split sums, HRNet's multi-resolution fusion)."""

    def __init__(self, graph: fx.GraphModule):
        self.graph = graph
        nodes = list(graph.graph.nodes)
        self.bit = {node: 1 << i for i, node in enumerate(nodes)}
        self.up, self.down = {}, {}
        for node in nodes:  # ancestors and descendants, the node included, as bit sets
            self.up[node] = self.bit[node] | _union(self.up[a] for a in node.all_input_nodes)
        for node in reversed(nodes):
            self.down[node] = self.bit[node] | _union(self.down[u] for u in node.users)
        self.weight_layers = _union(self.bit[n] for n in nodes if self._is_weight_layer(n))
        sums = [n for n in nodes if _target(n) in _ADDS and len(_full_operands(n)) == 2]
        split = {n: self._split(n) for n in sums}  # sum -> (fork, branch, residual or parallel)
        split = {n: found for n, found in split.items() if found is not None}
        parallel = {n for n, (_, _, residual) in split.items() if not residual}
        # a chain of sums from one fork is one sum of parallel branches (RepVGG: 1x1 + kxk, then + the identity norm)
        for a in split:
            for b in split:
                if a is not b and split[a][0] is split[b][0] and self.up[b] & self.bit[a]:
                    parallel |= {a, b}
        self.parallel = parallel
        self.residual = {n: (fork, branch) for n, (fork, branch, _) in split.items() if n not in parallel}

    def _split(self, node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, bool]]:
        """The sum ``node``'s fork, its branch operand and whether it is a residual add: the branch holds more weight
        layers than the shortcut, and the shortcut is not a norm of the fork alone (the identity branch of a
        re-parameterisable block, as in RepVGG, MobileOne and RepGhost, which sums parallel branches); None where no
        operand is the fork or a projection of it."""
        found = []
        for shortcut, branch in itertools.permutations(_full_operands(node)):
            fork, layers, normed = self._projection(shortcut, branch)
            if fork is not None:
                found.append((layers, normed, fork, branch))
        if not found:
            return None
        layers, normed, fork, branch = min(found, key=lambda f: f[:2])
        branch_layers = bin(self.weight_layers & self.up[branch] & self.down[fork] & ~self.bit[fork]).count('1')
        return fork, branch, branch_layers > layers and not (normed and layers == 0)

    def _projection(self, node: fx.Node, other: fx.Node) -> Tuple[Optional[fx.Node], int, bool]:
        """Where ``node`` forks from ``other``'s computation, if ``node`` is that point or a projection of it, the
        weight layers on the way and whether a norm is among them; (None, 0, False) where it is neither."""
        layers, normed = 0, False
        while not self.up[other] & self.bit[node]:
            inputs = [a for a in node.all_input_nodes if a.op != 'get_attr']
            if len(inputs) != 1 or not self._projects(node):
                return None, 0, False
            layers += self._is_weight_layer(node)
            normed |= node.op == 'call_module' and isinstance(self.graph.get_submodule(node.target), _BatchNorm)
            node = inputs[0]
        return node, layers, normed

    def _projects(self, node: fx.Node) -> bool:
        if node.op == 'call_module':
            module = self.graph.get_submodule(node.target)
            kind = type(module).__module__
            return isinstance(module, _PROJECTIONS) or kind.startswith(_IDENTITY_MODULES + _VALUE_MODULES)
        return _target(node) in _UNARY | _WEIGHT_LAYERS | _POOLS

    def _is_weight_layer(self, node: fx.Node) -> bool:
        if node.op == 'call_module':
            return isinstance(self.graph.get_submodule(node.target), (nn.modules.conv._ConvNd, nn.Linear))
        return _target(node) in _WEIGHT_LAYERS


def _union(masks) -> int:
    return functools.reduce(operator.or_, masks, 0)


def _find_sites(model: nn.Module, img_size, blocks_without_skip: bool) -> Tuple[Dict[str, torch.Size], Counter]:
    """The norms that end a residual branch (and, with ``blocks_without_skip``, a block without a skip), each with
    its output shape, in module order; and what the other residual branches end in, and the sums of parallel
    branches, counted."""
    graph = _shaped_graph(model, img_size)
    sums = _Sums(graph)
    ends, others = [], Counter()
    for _, branch in sums.residual.values():
        ends += _branch_ends(graph, branch)
    if sums.parallel:
        others[_PARALLEL] = len(sums.parallel)
    for block in [n for n, m in model.named_modules() if blocks_without_skip and getattr(m, 'has_skip', 1) is False]:
        inside = [n for n in graph.graph.nodes if block in n.meta.get('nn_module_stack', {})]
        node, norm = _branch_ends(graph, inside[-1], through='identity')[0] if inside else (None, None)
        if isinstance(norm, _BatchNorm) and isinstance(getattr(norm, 'act', None), (nn.Identity, type(None))):
            ends.append((node, norm))  # a linear norm ends it, as it ends an inverted residual
    sites = {}
    for node, module in ends:
        if isinstance(module, (_BatchNorm, NormNAM)):
            sites[node.target] = _shape(node)
        else:
            others[_what(node, module)] += 1
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(sites.items(), key=lambda site: order[site[0]])), others


_FOUND: 'OrderedDict[tuple, Tuple[Dict[str, torch.Size], Counter]]' = OrderedDict()


def _cached_find_sites(model: nn.Module, img_size, blocks_without_skip: bool):
    """`_find_sites`, once per network structure in a process: networks with the same modules (names, classes, their
    printed and plain attributes) have the same graph, so a model built again (timm's scripts, tests, every
    registered model of one family) is not traced and run again."""
    key = (to_2tuple(img_size), blocks_without_skip, *map(_structure, model.named_modules()))
    if key not in _FOUND:
        _FOUND[key] = _find_sites(model, img_size, blocks_without_skip)
        if len(_FOUND) > 64:
            _FOUND.popitem(last=False)
    sites, others = _FOUND[key]
    return dict(sites), Counter(others)


def _structure(named: Tuple[str, nn.Module]) -> tuple:
    name, module = named
    plain = tuple(
        (k, v) for k, v in vars(module).items() if k != 'training' and isinstance(v, (bool, int, float, str, tuple))
    )
    return name, type(module), module.extra_repr(), plain


def _what(node: fx.Node, module: Optional[nn.Module]) -> str:
    """What computes a node: its module's type, or its function's or method's name."""
    if module is not None:
        return type(module).__name__
    name = str(getattr(node.target, '__name__', node.target))
    return _NAMES.get(name, name)


def _refusal(model: nn.Module, others: Counter) -> str:
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return "it has no batch norm (NAM gates a batch norm's output with that norm's statistics)"
    parallel = others.pop(_PARALLEL, 0)
    if parallel and not others:
        return (
            f'its sums (×{parallel}) add parallel branches of one input, as the train-time blocks of MobileOne and '
            'RepVGG do, not a residual branch to its shortcut; NAM gates residual branches only'
        )
    if not others:
        return 'it has no residual add (NAM gates the branch of a residual block, before the add)'
    found = ', '.join(f'{t} ×{n}' for t, n in others.most_common())
    kind = ' (pre-activation blocks)' if set(others) <= {'Conv2d', 'Conv2dSame'} else ''
    also = f'; its other sums (×{parallel}) add parallel branches' if parallel else ''
    return f'none of its residual branches ends in a batch norm; they end in {found}{kind}{also}'


def nam_sites(model: nn.Module, blocks_without_skip: bool = False, img_size=None) -> List[str]:
    """The names of the norms NAM gates in ``model`` (see the module docstring); raises `NAMPlacementError` where
    there are none. ``img_size``: the input it is traced with (default: 64 px, or the model's own size where it
    takes no other)."""
    return list(_sites(model, blocks_without_skip, img_size))


def _sites(model: nn.Module, blocks_without_skip: bool, img_size) -> Dict[str, torch.Size]:
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise NAMPlacementError(f'Cannot add NAM to {model_name(model)}: {_refusal(model, Counter())}')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    own = tuple((cfg.get('input_size') or (3, 224, 224))[-2:])
    # shapes are all that is needed: a small image, unless the network takes only its own size (or no small one)
    sizes = [img_size] if img_size is not None else [own] if cfg.get('fixed_input_size') else [(64, 64), own]
    for size in sizes:
        try:
            sites, others = _cached_find_sites(model, size, blocks_without_skip)
            break
        except NAMPlacementError as e:
            error = e
    else:
        raise error
    if not sites:
        raise NAMPlacementError(f'Cannot add NAM to {model_name(model)}: {_refusal(model, others)}')
    norms = {site: model.get_submodule(site) for site in sites}
    problems = [f'{s} already has a NAM gate' for s, norm in norms.items() if isinstance(norm, NormNAM)] + [
        f'{s} is a {type(norm).__name__} without affine parameters or running statistics'
        for s, norm in norms.items()
        if not isinstance(norm, NormNAM) and not (norm.affine and norm.track_running_stats)
    ]
    if problems:
        shown = '; '.join(problems[:4]) + (f' (+{len(problems) - 4} more)' if len(problems) > 4 else '')
        raise NAMPlacementError(f'Cannot add NAM to {model_name(model)}: {shown}')
    return sites


def insert_nam(
    model: nn.Module, kind: str = 'nam', img_size=None, blocks_without_skip: bool = False, **options
) -> nn.Module:
    """Put a NAM gate of ``kind`` after the norm that ends every residual branch of ``model`` (and every block without
    a skip, with ``blocks_without_skip``), in place, and return it.

    Every site is checked before anything changes: a network NAM cannot be placed in raises `NAMPlacementError`
    and is left as it was. Spatial kinds are built for ``img_size``; ``options`` go to the NAM layers.
    """
    if kind not in SITE_KINDS:
        raise ValueError(f'Unknown NAM kind {kind!r}; expected one of {list(SITE_KINDS)}')
    if kind in NAM_KINDS and kind != 'nam' and img_size is None:
        raise NAMPlacementError(f'{model_name(model)}: spatial NAM needs img_size= (one scale per pixel position)')
    for site, shape in _sites(model, blocks_without_skip, img_size).items():
        norm = model.get_submodule(site)
        act = getattr(norm, 'act', None)
        if act is not None:  # the gate goes between the norm and its activation
            norm.act = nn.Identity()
        pixels = dict(feat_size=tuple(shape[-2:])) if kind in ('nam_sp', 'nam_chsp') else {}
        gate = create_attn(kind, norm.num_features, **pixels, **options, **factory_kwargs(norm))
        parent, _, attr = site.rpartition('.')
        setattr(model.get_submodule(parent), attr, norm_nam(norm, gate, act).train(norm.training))
    return model
