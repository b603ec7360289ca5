"""Where a ResNet-50 step spends its device time with and without NAM: torch.profiler's kernel table.

For plain ResNet-50 and ResNet-50 NAM (as built and reparameterized), eager and compiled, inference and training,
profiles a few steps and writes the top kernels by total device time, their count per step and the step's total
kernel time. The difference between a NAM row and the plain row of the same mode is what NAM costs, kernel by kernel.

    python -m lab.benchmarks.profile_gate --device cuda --amp --channels-last --batch-size 256
"""

import argparse
import collections
import datetime
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.utils import reparameterize_model
from torch.profiler import ProfilerActivity, profile

import timm_nam  # noqa: F401  registers the models


def _cases(compiled: bool):
    for label, name, fused in (
        ('resnet50', 'resnet50', False),
        ('resnet50_nam', 'resnet50_nam', False),
        ('resnet50_nam reparameterized', 'resnet50_nam', True),
    ):
        yield label + (' +compile' if compiled else ''), name, fused


def profile_case(name, fused, training, compiled, args, device):
    torch.manual_seed(0)
    model = timm.create_model(name).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if fused:
        model = reparameterize_model(model.eval())
    model.train(training)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            if not training:
                with torch.no_grad():
                    return fwd(x)
            loss = loss_fn(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    totals, counts = collections.Counter(), collections.Counter()
    for evt in prof.key_averages():
        t = evt.device_time_total if device.type == 'cuda' else evt.self_cpu_time_total
        if device.type == 'cuda' and evt.device_type.name != 'CUDA':
            continue
        totals[evt.key] += t
        counts[evt.key] += evt.count
    return totals, counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--top', type=int, default=12)
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--out', default='results/benchmarks')
    args = p.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    lines = [
        f'Profiled {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {where}, torch '
        f'{torch.__version__}, timm {timm.__version__}: batch {args.batch_size}, 224 px, '
        f'{"AMP bf16, " if args.amp else ""}{"channels-last, " if args.channels_last else ""}{args.steps} steps '
        'per case; times are per step, in ms of kernel time (self CPU time on a CPU).',
        '',
    ]
    for training in (False, True):
        for compiled in (False,) if args.no_compile else (False, True):
            for label, name, fused in _cases(compiled):
                if training and fused:
                    continue
                torch._dynamo.reset()
                totals, counts = profile_case(name, fused, training, compiled, args, device)
                total = sum(totals.values()) / args.steps / 1e3
                kernels = sum(counts.values()) / args.steps
                lines += [
                    f'### {label}, {"training" if training else "inference"}: {total:.2f} ms, '
                    f'{kernels:.0f} kernels per step',
                    '',
                    '| kernel | ms/step | count/step |',
                    '|---|---:|---:|',
                ]
                for key, t in totals.most_common(args.top):
                    lines.append(f'| `{key[:90]}` | {t / args.steps / 1e3:.3f} | {counts[key] / args.steps:.0f} |')
                lines.append('')
                print('\n'.join(lines[-(args.top + 4) :]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'profile_{device.type}.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
