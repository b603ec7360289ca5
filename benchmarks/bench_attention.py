""" Speed and memory of NAM against no attention, SE, CBAM and the authors' plain NAM formula.

For ResNet-50 and MobileNetV2: inference and training throughput (images/s), peak memory, parameters, FLOPs
and the sparsity penalty's share of a training step. All variants are timed round-robin in one process
(the machine is noisy), several rounds, and each ratio to the base model is the median of per-round
ratios. Writes a markdown table and a CSV (with machine, versions and date) to --out.

    python benchmarks/bench_attention.py                     # CPU: batch 8, 224 px, eager
    python benchmarks/bench_attention.py --compile --families resnet50 --variants SE "NAM (ours)" --name bench_cpu_compile
    python benchmarks/bench_attention.py --device cuda --amp --channels-last --compile --batch-size 256
"""
import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from authors_nam import AuthorsChannelAtt  # noqa: E402

from timm_nam.flops import count_flops  # noqa: E402
from timm_nam.penalty import NAMSparsityLoss  # noqa: E402

VARIANTS = {
    'resnet50': [
        ('base', lambda s: timm.create_model('resnet50')),
        ('SE', lambda s: timm.create_model('seresnet50')),
        ('CBAM', lambda s: timm.create_model('resnet50', block_args=dict(attn_layer='cbam'))),
        ("authors' NAM", lambda s: timm.create_model('resnet50', block_args=dict(attn_layer=AuthorsChannelAtt))),
        ('NAM (ours)', lambda s: timm.create_model('resnet50_nam')),
    ],
    'mobilenetv2': [
        ('base', lambda s: timm.create_model('mobilenetv2_100')),
        ('SE', lambda s: timm.create_model('mobilenetv2_100_se')),
        ('CBAM', lambda s: timm.create_model('mobilenetv2_100_cbam')),
        ('NAM ch (ours)', lambda s: timm.create_model('mobilenetv2_100_nam_ch')),
        ('NAM ch+sp (ours)', lambda s: timm.create_model('mobilenetv2_100_nam', img_size=s)),
    ],
}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'cpu': cpu, 'cores': os.cpu_count(), 'threads': torch.get_num_threads(),
        'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
        'device': str(device),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Runner:
    """One model variant prepared for timing: inference and training closures on fixed data."""

    def __init__(self, name, make, args, device):
        self.name = name
        torch.manual_seed(0)
        self.model = make(args.img_size).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.flops = count_flops(self.model.cpu(), (3, args.img_size, args.img_size)).paper_flops
        self.model.to(device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch_size,), device=device)
        self.device = device
        self.amp = args.amp
        self.compiled = args.compile_variant
        self.model_fwd = torch.compile(self.model) if self.compiled else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        crit = nn.CrossEntropyLoss()
        self.has_nam = 'NAM' in name and 'authors' not in name
        self.loss_plain = crit
        self.loss_pen = NAMSparsityLoss(crit, self.model, p=1e-4) if self.has_nam else crit

    def _autocast(self):
        dtype = torch.bfloat16 if self.device.type == 'cpu' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp)

    @torch.no_grad()
    def infer(self, iters):
        self.model.eval()
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            with self._autocast():
                self.model_fwd(self.x)
        _sync(self.device)
        return iters * self.x.shape[0] / (time.perf_counter() - t)

    def train_step(self, loss_fn):
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = loss_fn(self.model_fwd(self.x), self.y)
        loss.backward()
        self.opt.step()

    def train(self, iters, penalty=True):
        self.model.train()
        loss_fn = self.loss_pen if penalty else self.loss_plain
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            self.train_step(loss_fn)
        _sync(self.device)
        return iters * self.x.shape[0] / (time.perf_counter() - t)

    def peak_memory_mb(self):
        """CUDA: peak allocated bytes of a training step. CPU: bytes of tensors autograd saves for backward
        in one training step (activation memory, which is what attention layers add)."""
        self.model.train()
        if self.compiled and self.device.type != 'cuda':
            return None  # a compiled graph saves its tensors internally: the hook below cannot see them
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step(self.loss_pen)
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        saved = {}

        def pack(t):
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with self._autocast():
                loss = self.loss_pen(self.model_fwd(self.x), self.y)
        loss.backward()
        return sum(saved.values()) / 2 ** 20

    def penalty_seconds(self, iters=50):
        """Time of the penalty's forward and backward alone (it is a separate term of the loss)."""
        if not self.has_nam:
            return None
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            self.loss_pen.penalty().backward()
        _sync(self.device)
        return (time.perf_counter() - t) / iters


def run_family(family, args, device):
    runners = []
    for name, make in VARIANTS[family]:
        if args.variants and name not in args.variants and name != 'base':
            continue
        for compiled in ([False, True] if args.compile else [False]):
            args.compile_variant = compiled
            label = name + (' +compile' if compiled else '')
            runners.append(Runner(label, make, args, device))
    # warm up (and compile) everything first
    for r in runners:
        r.infer(args.warmup)
        r.train(args.warmup)
    results = {r.name: {'infer': [], 'train': [], 'pen': []} for r in runners}
    for _ in range(args.rounds):
        for r in runners:
            results[r.name]['infer'].append(r.infer(args.iters))
        for r in runners:
            results[r.name]['train'].append(r.train(args.iters))
        for r in runners:
            seconds = r.penalty_seconds()
            if seconds is not None:  # share of this round's median-free step time
                step_seconds = args.batch_size / results[r.name]['train'][-1]
                results[r.name]['pen'].append(seconds / step_seconds)
    rows = []
    base = {c: results['base' + c] for c in ('', ' +compile') if 'base' + c in results}
    for r in runners:
        res = results[r.name]
        b = base[' +compile' if r.name.endswith('+compile') else '']
        rows.append({
            'family': family,
            'variant': r.name,
            'params_M': r.params / 1e6,
            'flops_G': r.flops / 1e9,
            'infer_img_s': statistics.median(res['infer']),
            'infer_ratio': statistics.median(a / c for a, c in zip(res['infer'], b['infer'])),
            'train_img_s': statistics.median(res['train']),
            'train_ratio': statistics.median(a / c for a, c in zip(res['train'], b['train'])),
            'memory_MB': r.peak_memory_mb(),
            'penalty_share_pct': 100 * statistics.median(res['pen']) if res['pen'] else None,
        })
    return rows


def to_markdown(rows, info, args) -> str:
    mem = 'peak CUDA memory of a training step' if info['device'].startswith('cuda') else \
        'activations saved for backward in one training step'
    lines = [
        f"Measured {info['date']} on {info.get('gpu', info['cpu'])} ({info['cores']} cores, {info['threads']} torch "
        f"threads), torch {info['torch']}, timm {info['timm']}, python {info['python']}.",
        f"Batch {args.batch_size}, {args.img_size} px, {'AMP, ' if args.amp else ''}"
        f"{'channels-last, ' if args.channels_last else ''}{args.rounds} rounds x {args.iters} iterations, "
        'medians; ratios are per-round ratios to the base model in the same mode (eager or compiled).',
        f'Memory: {mem}. Penalty: share of a training step spent on the NAM sparsity penalty (p=1e-4).', '',
        '| model | variant | params | FLOPs | inference img/s | vs base | training img/s | vs base | memory MB '
        '| penalty share |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        pen = '—' if r['penalty_share_pct'] is None else f"{r['penalty_share_pct']:.2f}%"
        mem = '—' if r['memory_MB'] is None else f"{r['memory_MB']:.0f}"
        lines.append(
            f"| {r['family']} | {r['variant']} | {r['params_M']:.2f}M | {r['flops_G']:.3f}G | {r['infer_img_s']:.1f} "
            f"| {r['infer_ratio']:.3f}x | {r['train_img_s']:.1f} | {r['train_ratio']:.3f}x | {mem} "
            f"| {pen} |")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='also time torch.compile variants')
    p.add_argument('--families', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--variants', nargs='+', help='only these variants (and base), e.g. SE "NAM (ours)"')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--out', default='results/benchmarks', help='output directory')
    p.add_argument('--name', help='file name stem (default: bench_<device>)')
    p.add_argument('--render', metavar='JSON', help='only re-render the markdown of an earlier run\'s .json')
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        for k, v in saved['args'].items():
            setattr(args, k, v)
        Path(args.render).with_suffix('.md').write_text(to_markdown(saved['rows'], saved['machine'], args))
        return
    device = torch.device(args.device)
    info = machine_info(device)
    rows = []
    for family in args.families:
        rows += run_family(family, args, device)
        print(to_markdown(rows, info, args), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f'bench_{device.type}'
    (out / f'{stem}.md').write_text(to_markdown(rows, info, args))
    with open(out / f'{stem}.csv', 'w', newline='') as f:
        fields = list(rows[0]) + list(info) + ['batch_size', 'img_size', 'amp', 'channels_last']
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **info, 'batch_size': args.batch_size, 'img_size': args.img_size, 'amp': args.amp,
                             'channels_last': args.channels_last})
    (out / f'{stem}.json').write_text(json.dumps({'machine': info, 'args': vars(args), 'rows': rows}, indent=1))
    print(f'wrote {out / (stem + ".md")} and .csv/.json')


if __name__ == '__main__':
    main()
