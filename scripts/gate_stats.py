"""How far do NAM's gates move from 0.5? Gate values sigmoid(w·BN(x)) of every NAM layer on a few val images.

python scripts/gate_stats.py DATA_ROOT RUN_DIR [RUN_DIR ...] [--images 10] > gate_stats.md
"""

import argparse

import torch
from timm.data import create_dataset, create_transform

from timm_nam.layers import NAMChannel, NAMSpatial
from timm_nam.training.checkpoint import create_model_from_checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_root')
    p.add_argument('runs', nargs='+')
    p.add_argument('--images', type=int, default=10)
    args = p.parse_args()
    print('| run | gate | min | max | mean std within a layer |\n|---|---|---:|---:|---:|')
    for run in args.runs:
        model, _ = create_model_from_checkpoint(f'{run}/last.safetensors')
        model.eval()
        size = model.pretrained_cfg['input_size'][-1]
        ds = create_dataset('', root=args.data_root, split='val')
        ds.transform = create_transform(size, is_training=False)
        step = max(len(ds) // args.images, 1)
        x = torch.stack([ds[i * step][0] for i in range(args.images)])
        stats = {'channel': [], 'pixel': []}

        def hook(kind):
            def record(module, inputs, out):
                gate = (out / inputs[0])[inputs[0].abs() > 1e-3]  # out = gate * input
                stats[kind].append((gate.min().item(), gate.max().item(), gate.std().item()))

            return record

        for m in model.modules():
            if isinstance(m, (NAMChannel, NAMSpatial)):
                m.register_forward_hook(hook('channel' if isinstance(m, NAMChannel) else 'pixel'))
        with torch.no_grad():
            model(x)
        for kind, rows in stats.items():
            if rows:
                print(
                    f'| {run.rstrip("/").split("/")[-1]} | {kind} | {min(r[0] for r in rows):.4f} | '
                    f'{max(r[1] for r in rows):.4f} | {sum(r[2] for r in rows) / len(rows):.4f} |'
                )


if __name__ == '__main__':
    main()
