"""Speed and memory of NAM against no attention, SE, CBAM and the authors' plain NAM formula.

For ResNet-50 and MobileNetV2: inference throughput as built and after ``timm.utils.reparameterize_model`` (NAM
folded to ``x·sigmoid(a·x + b)``), training throughput (images/s), training memory, parameters, FLOPs and the
sparsity penalty's share of a training step. All variants are timed round-robin in one process (the machine is
noisy), several rounds, and each ratio to the base model is the median of per-round ratios; memory ratios are to
the base model too. Writes a markdown table and a CSV (with machine, versions and date) to --out.

    python -m lab.benchmarks.bench_attention                     # CPU: batch 8, 224 px, eager
    python -m lab.benchmarks.bench_attention --compile --families resnet50 --variants SE "NAM (ours)" \
        --name bench_cpu_compile
    python -m lab.benchmarks.bench_attention --device cuda --amp --channels-last --compile --batch-size 256
    bash lab/benchmarks/run_gpu.sh eager|compile            # the GPU tables as committed
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
from timm.utils import reparameterize_model

import timm_nam
from lab.benchmarks.authors_nam import AuthorsChannelAtt
from timm_nam.flops import count_flops
from timm_nam.penalty import NAMSparsityLoss, l1_penalty, nam_scales


class SigmoidFloor(nn.Module):
    """Not attention: ``x.sigmoid_()`` in place, the least any gate that computes one sigmoid per element can
    cost (no allocation, one pass). A reference for what NAM's eager gate can reach with PyTorch ops; inference
    only (the in-place sigmoid breaks the block's backward)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__()

    def forward(self, x):
        return x.sigmoid_()


def _replace_nam(model: nn.Module, layer_cls) -> nn.Module:
    """``model`` with every NAM channel gate replaced by ``layer_cls(channels)`` at the same place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, timm_nam.NAMChannel):
                setattr(module, name, layer_cls(child.channels))
    return model


INFERENCE_ONLY = 'sigmoid floor'  # variants timed for inference only

VARIANTS = {
    'resnet50': [
        ('base', lambda s: timm.create_model('resnet50')),
        ('SE', lambda s: timm.create_model('seresnet50')),
        ('CBAM', lambda s: timm.create_model('resnet50', block_args=dict(attn_layer='cbam'))),
        ('SimAM', lambda s: timm.create_model('resnet50', block_args=dict(attn_layer=timm_nam.SimAM))),
        ("authors' NAM", lambda s: timm.create_model('resnet50', block_args=dict(attn_layer=AuthorsChannelAtt))),
        ('NAM (ours)', lambda s: timm.create_model('resnet50_nam')),
        ('sigmoid floor', lambda s: timm.create_model('resnet50', block_args=dict(attn_layer=SigmoidFloor))),
    ],
    'mobilenetv2': [
        ('base', lambda s: timm.create_model('mobilenetv2_100')),
        ('SE', lambda s: timm.create_model('mobilenetv2_100_se')),
        ('CBAM', lambda s: timm.create_model('mobilenetv2_100_cbam')),
        ('SimAM', lambda s: _replace_nam(timm.create_model('mobilenetv2_100_nam'), timm_nam.SimAM)),
        ('NAM ch (ours)', lambda s: timm.create_model('mobilenetv2_100_nam')),
        ('NAM ch+sp (ours)', lambda s: timm.create_model('mobilenetv2_100_nam_chsp', img_size=s)),
        ('sigmoid floor', lambda s: _replace_nam(timm.create_model('mobilenetv2_100_nam'), SigmoidFloor)),
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
        'cpu': cpu,
        'cores': os.cpu_count(),
        'threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
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
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
            memory_format=fmt
        )
        self.y = torch.randint(0, 1000, (args.batch_size,), device=device)
        self.device = device
        self.amp = args.amp
        self.compiled = args.compile_variant
        self.model_fwd = torch.compile(self.model) if self.compiled else self.model
        self.fused = reparameterize_model(self.model.eval())  # a folded copy for inference
        if not any(isinstance(m, timm_nam.NAMGate) for m in self.fused.modules()):
            self.fused, self.fused_fwd = self.model, self.model_fwd  # reparameterizing changed nothing
        else:
            self.fused_fwd = torch.compile(self.fused) if self.compiled else self.fused
        self.amp_dtype = getattr(torch, args.amp_dtype)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        crit = nn.CrossEntropyLoss()
        self.has_nam = 'NAM' in name and 'authors' not in name
        self.loss_plain = crit
        self.loss_pen = NAMSparsityLoss(crit, self.model, p=1e-4) if self.has_nam else crit

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    @torch.no_grad()
    def infer(self, iters, fused=False):
        self.model.eval()
        fwd = self.fused_fwd if fused else self.model_fwd
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            with self._autocast():
                fwd(self.x)
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
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        saved = {}

        def pack(t):
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with self._autocast():
                loss = self.loss_pen(self.model_fwd(self.x), self.y)
        loss.backward()
        return sum(saved.values()) / 2**20

    def penalty_seconds(self, iters=50):
        """Time of the penalty's forward and backward alone (it is a separate term of the loss)."""
        if not self.has_nam:
            return None
        scales = nam_scales(self.model)
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            l1_penalty(scales, self.loss_pen.p).backward()
        _sync(self.device)
        return (time.perf_counter() - t) / iters


def run_family(family, args, device):
    runners = []
    for name, make in VARIANTS[family]:
        if args.variants and name not in args.variants and name != 'base':
            continue
        for compiled in [False, True] if args.compile else [False]:
            args.compile_variant = compiled
            label = name + (' +compile' if compiled else '')
            runners.append(Runner(label, make, args, device))
    trained = [r for r in runners if not r.name.startswith(INFERENCE_ONLY)]
    # warm up (and compile) everything first
    for r in runners:
        r.infer(args.warmup)
        r.infer(args.warmup, fused=True)
    for r in trained:
        r.train(args.warmup)
    results = {r.name: {'infer': [], 'fused': [], 'train': [], 'pen': []} for r in runners}
    for _ in range(args.rounds):
        for r in runners:
            results[r.name]['infer'].append(r.infer(args.iters))
        for r in runners:
            results[r.name]['fused'].append(r.infer(args.iters, fused=True))
        for r in trained:
            results[r.name]['train'].append(r.train(args.iters))
        for r in trained:
            seconds = r.penalty_seconds()
            if seconds is not None:  # share of this round's median-free step time
                step_seconds = args.batch_size / results[r.name]['train'][-1]
                results[r.name]['pen'].append(seconds / step_seconds)
    rows = []
    base = {c: results['base' + c] for c in ('', ' +compile') if 'base' + c in results}
    memory = {r.name: r.peak_memory_mb() if r in trained else None for r in runners}
    for r in runners:
        res = results[r.name]
        mode = ' +compile' if r.name.endswith('+compile') else ''
        b = base[mode]
        mem, base_mem = memory[r.name], memory['base' + mode]
        rows.append(
            {
                'family': family,
                'variant': r.name,
                'params_M': r.params / 1e6,
                'flops_G': r.flops / 1e9,
                'infer_img_s': statistics.median(res['infer']),
                'infer_ratio': statistics.median(a / c for a, c in zip(res['infer'], b['infer'])),
                'fused_img_s': statistics.median(res['fused']),
                'fused_ratio': statistics.median(a / c for a, c in zip(res['fused'], b['infer'])),
                'train_img_s': statistics.median(res['train']) if res['train'] else None,
                'train_ratio': statistics.median(a / c for a, c in zip(res['train'], b['train']))
                if res['train']
                else None,
                'memory_MB': mem,
                'memory_ratio': None if mem is None or base_mem is None else mem / base_mem,
                'penalty_share_pct': 100 * statistics.median(res['pen']) if res['pen'] else None,
            }
        )
    return rows


def to_markdown(rows, info, args) -> str:
    mem = (
        'peak CUDA memory of a training step'
        if info['device'].startswith('cuda')
        else 'activations saved for backward in one training step'
    )
    processes = f' in each of {info["processes"]} processes (medians over them)' if info.get('processes') else ''
    lines = [
        f'Measured {info["date"]} on {info.get("gpu", info["cpu"])} ({info["cores"]} cores, {info["threads"]} torch '
        f'threads), torch {info["torch"]}, timm {info["timm"]}, python {info["python"]}.',
        f'Batch {args.batch_size}, {args.img_size} px, {f"AMP {args.amp_dtype}, " if args.amp else ""}'
        f'{"channels-last, " if args.channels_last else ""}{args.rounds} rounds x {args.iters} iterations'
        f'{processes}, '
        'medians; ratios are per-round ratios to the base model in the same mode (eager or compiled).',
        f'Memory: {mem}. Reparameterized: inference after `timm.utils.reparameterize_model` (NAM folded; the '
        'other models are unchanged by it), ratio to the base model as built. Penalty: share of a training step '
        'spent on the NAM sparsity penalty (p=1e-4).',
        '',
        '| model | variant | params | FLOPs | inference img/s | vs base | reparameterized img/s | vs base '
        '| training img/s | vs base | memory MB | vs base | penalty share |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        pen = '—' if r['penalty_share_pct'] is None else f'{r["penalty_share_pct"]:.2f}%'
        mem = '—' if r['memory_MB'] is None else f'{r["memory_MB"]:.0f}'
        mem_ratio = '—' if r.get('memory_ratio') is None else f'{r["memory_ratio"]:.3f}x'
        train = '— | —' if r['train_img_s'] is None else f'{r["train_img_s"]:.1f} | {r["train_ratio"]:.3f}x'
        lines.append(
            f'| {r["family"]} | {r["variant"]} | {r["params_M"]:.2f}M | {r["flops_G"]:.3f}G | {r["infer_img_s"]:.1f} '
            f'| {r["infer_ratio"]:.3f}x | {r["fused_img_s"]:.1f} | {r["fused_ratio"]:.3f}x '
            f'| {train} | {mem} | {mem_ratio} | {pen} |'
        )
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='also time torch.compile variants')
    p.add_argument('--families', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--variants', nargs='+', help='only these variants (and base), e.g. SE "NAM (ours)"')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument(
        '--processes',
        type=int,
        default=1,
        help='run the whole benchmark in this many fresh processes, one after another, and report the '
        "median of each number over them (a noisy CPU moves one process's medians by several %%)",
    )
    p.add_argument('--out', default='results/benchmarks', help='output directory')
    p.add_argument('--name', help='file name stem (default: bench_<device>)')
    p.add_argument('--render', metavar='JSON', help="only re-render the markdown of an earlier run's .json")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        for k, v in saved['args'].items():
            setattr(args, k, v)
        Path(args.render).with_suffix('.md').write_text(to_markdown(saved['rows'], saved['machine'], args))
        return
    device = torch.device(args.device)
    info = machine_info(device)
    if args.processes > 1:
        rows = _run_in_processes(argv if argv is not None else sys.argv[1:], args.processes)
        info['processes'] = args.processes
    else:
        rows = []
        for family in args.families:
            rows += run_family(family, args, device)
            print(to_markdown(rows, info, args), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f'bench_{device.type}'
    (out / f'{stem}.md').write_text(to_markdown(rows, info, args))
    with open(out / f'{stem}.csv', 'w', newline='') as f:
        fields = (
            list(dict.fromkeys(k for r in rows for k in r))
            + list(info)
            + ['batch_size', 'img_size', 'amp', 'channels_last']
        )
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    **r,
                    **info,
                    'batch_size': args.batch_size,
                    'img_size': args.img_size,
                    'amp': args.amp,
                    'channels_last': args.channels_last,
                }
            )
    (out / f'{stem}.json').write_text(json.dumps({'machine': info, 'args': vars(args), 'rows': rows}, indent=1))
    print(f'wrote {out / (stem + ".md")} and .csv/.json')


def _run_in_processes(argv, processes: int) -> list:
    """Rows of ``processes`` separate runs, each number the median over the runs (``<key>_runs`` keeps them all)."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            cmd = [sys.executable, '-m', 'lab.benchmarks.bench_attention', *argv, '--processes', '1', '--out', tmp]
            cmd += ['--name', f'run{i}']
            subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2])
            runs.append(json.loads((Path(tmp) / f'run{i}.json').read_text())['rows'])
    rows = []
    for per_run in zip(*runs):
        row = dict(per_run[0])
        for key, value in per_run[0].items():
            if isinstance(value, float) and all(r[key] is not None for r in per_run):
                row[key] = statistics.median(r[key] for r in per_run)
                row[f'{key}_runs'] = [r[key] for r in per_run]
        rows.append(row)
    return rows


if __name__ == '__main__':
    main()
