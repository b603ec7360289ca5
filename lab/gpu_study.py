"""The Imagenette study at 128 px on one GPU, with the data decoded once and kept on the GPU.

    python -m lab.gpu_study pack <imagenette2-224> data128/imagenette128.tar   # 128-px JPEGs: 2 shards, 99 MB
    python -m lab.gpu_study run data128/imagenette128_*.tar [--models ...] [--seeds ...]

``run`` decodes the packed JPEGs on the GPU once (``torchvision.io.decode_jpeg``), keeps the uint8 images there, and
trains every (model, seed) not yet in the CSV: random crop (padding 16) and flip on the GPU, bf16 autocast,
channels-last, the training loop's optimizer and scheduler for the ``imagenet`` recipe (SGD with Nesterov momentum, no
weight decay on norms and biases, cosine schedule stepped per update after a one-epoch warmup), label smoothing 0.1,
the paper's sparsity penalty on NAM models (`timm_nam.NAMSparsityLoss`). Rows are appended to the study's CSV
(families ``resnet18_128`` and ``mobilenetv2_128``) after each run, so a call that runs out of time loses one run at
most; the summary script groups them by their recipe string. ``--deadline`` stops starting runs after that many
seconds.

On a remote GPU machine whose calls carry at most 64 MiB each: pack into ``data128/`` (ignored by git) here; the
first call carries shard 0 and only starts the machine, the second carries shard 1 and runs
``python -m lab.gpu_study run data128/imagenette128_*.tar --csv data128/runs.csv --deadline 540;
cp data128/runs.csv $OUT/``; further calls on the warm machine repeat it (the CSV stays there and says which runs
are done) until no run is left. Append the returned rows to ``results/imagenette_study/runs.csv``.

Time estimate (not measured): ResNet-18 at 128 px, 16 epochs of 9,469 images is about 150k training images, some
10–20 s on an H100 in bf16; 30 runs (two families x five models x three seeds) about 10 minutes including CBAM's
slower kernels. MobileNetV2's depthwise convolutions are slower per FLOP than ResNet-18's.
"""

import argparse
import csv
import io
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FAMILIES = {
    'resnet18': ['resnet18', 'resnet18_se', 'resnet18_cbam', 'resnet18_nam', 'resnet18_nam:nam_weighting=mean'],
    'mobilenetv2': [
        'mobilenetv2_100',
        'mobilenetv2_100_se',
        'mobilenetv2_100_cbam',
        'mobilenetv2_100_nam',
        'mobilenetv2_100_nam:nam_weighting=mean',
    ],
}
LR = {'resnet18': 0.2, 'mobilenetv2': 0.1}  # batch 256
SIZE, PAD = 128, 16


def pack(data_dir: Path, out: Path, quality: int = 90, shard_mb: float = 60.0) -> list:
    """Resize every image to SIZE x SIZE once and write them as JPEGs (split/class/name.jpg) into tars of at most
    ``shard_mb`` MB each (``out`` with _0, _1, ... before the suffix), small enough to carry one per call."""
    from PIL import Image

    shards, tar, written = [], None, 0
    for path in sorted(data_dir.glob('*/*/*')):
        split, cls = path.parts[-3], path.parts[-2]
        buf = io.BytesIO()
        Image.open(path).convert('RGB').resize((SIZE, SIZE), Image.BICUBIC).save(buf, 'JPEG', quality=quality)
        if tar is None or written + buf.tell() > shard_mb * 1e6:
            if tar is not None:
                tar.close()
            shards.append(out.with_name(f'{out.stem}_{len(shards)}{out.suffix}'))
            tar, written = tarfile.open(shards[-1], 'w'), 0
        info = tarfile.TarInfo(f'{split}/{cls}/{path.stem}.jpg')
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)
        written += info.size + 1024  # the header and padding
    if tar is not None:
        tar.close()
    return shards


def load(tar_paths, device: torch.device):
    """{'train': (uint8 images N,3,H,W on device, labels), 'val': ...} from the packed shards, decoded on the device."""
    from torchvision.io import decode_jpeg

    data = {'train': ([], []), 'val': ([], [])}
    for tar_path in tar_paths:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                split, cls, _ = member.name.split('/')
                raw = torch.frombuffer(bytearray(tar.extractfile(member).read()), dtype=torch.uint8)
                data[split][0].append(raw)
                data[split][1].append(cls)
    classes = {cls: i for i, cls in enumerate(sorted(set(data['train'][1] + data['val'][1])))}
    data = {split: (raws, [classes[c] for c in labels]) for split, (raws, labels) in data.items()}
    out = {}
    for split, (raws, labels) in data.items():
        images = decode_jpeg(raws, device=device if device.type == 'cuda' else 'cpu')
        out[split] = (torch.stack(images).to(device), torch.tensor(labels, device=device))
    return out, len(classes)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of a zero-padded image and a horizontal flip, per image, on the images' device."""
    n, device = images.shape[0], images.device
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    dy, dx = torch.randint(0, 2 * PAD + 1, (2, n, 1), generator=generator, device=device)
    span = torch.arange(SIZE, device=device)
    rows = (dy + span)[:, None, :, None]  # (n, 1, SIZE, 1)
    cols = (dx + span)[:, None, None, :]  # (n, 1, 1, SIZE)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    crops = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def normalize(images: torch.Tensor) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def train_one(spec: str, family: str, seed: int, data, num_classes: int, args) -> dict:
    import timm
    from imagenette_study import split_spec

    import timm_nam
    from lab.trainer.loop import create_lr_scheduler, create_optimizer
    from lab.trainer.recipes import get_recipe
    from timm_nam.penalty import resolve_penalty

    name, kwargs = split_spec(spec)
    device = data['train'][0].device
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **kwargs).to(device, memory_format=torch.channels_last)
    p = resolve_penalty(model)
    recipe = get_recipe(
        'imagenet',
        lr=LR[family],
        batch_size=args.batch_size,
        epochs=args.epochs,
        weight_decay=args.weight_decay,
        warmup_epochs=1,
        sched_on_updates=True,
        img_size=SIZE,
        seed=seed,
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
    loss_fn = timm_nam.NAMSparsityLoss(criterion, model, p) if p else criterion
    opt = create_optimizer(model, recipe)
    images, labels = data['train']
    steps_per_epoch = images.shape[0] // args.batch_size
    sched, _ = create_lr_scheduler(opt, recipe, steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(seed)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(images.shape[0], generator=gen, device=device)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = normalize(augment(images[idx], gen))
            with torch.autocast(**amp):
                loss = loss_fn(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
        sched.step(epoch + 1)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    val_images, val_labels = data['val']
    correct1 = correct5 = 0
    with torch.no_grad(), torch.autocast(**amp):
        for i in range(0, val_images.shape[0], 500):
            logits = model(normalize(val_images[i : i + 500]))
            top5 = logits.topk(min(5, num_classes), dim=1).indices
            target = val_labels[i : i + 500, None]
            correct1 += (top5[:, :1] == target).sum().item()
            correct5 += (top5 == target).any(1).sum().item()
    n = val_images.shape[0]
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    return dict(
        family=f'{family}_128',
        model=spec,
        seed=seed,
        recipe=recipe_string(family, args),
        top1=round(100 * correct1 / n, 3),
        top5=round(100 * correct5 / n, 3),
        best_top1=round(100 * correct1 / n, 3),
        params=sum(q.numel() for q in model.parameters()),
        flops_g='',
        train_img_s=round(steps_per_epoch * args.batch_size * args.epochs / (minutes * 60), 1),
        train_minutes=round(minutes, 2),
        penalty_p=p,
        device=f'{device} ({device_name})',
        date=time.strftime('%Y-%m-%d'),
        timm_nam=timm_nam.__version__,
    )


def recipe_string(family: str, args) -> str:
    return (
        f'gpu_study.py --img-size {SIZE} -b {args.batch_size} --epochs {args.epochs} --lr {LR[family]} '
        f'--weight-decay {args.weight_decay} --amp bfloat16 --channels-last'
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    pk = sub.add_parser('pack')
    pk.add_argument('data_dir', type=Path)
    pk.add_argument('out', type=Path)
    pk.add_argument('--shard-mb', type=float, default=60.0)
    rn = sub.add_parser('run')
    rn.add_argument('tars', type=Path, nargs='+', help='the shards pack wrote')
    rn.add_argument('--csv', type=Path, default=Path('results/imagenette_study/runs.csv'))
    rn.add_argument('--families', nargs='+', default=list(FAMILIES), choices=list(FAMILIES))
    rn.add_argument('--models', nargs='+', help='only these (default: every model of the families)')
    rn.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    rn.add_argument('--epochs', type=int, default=16)
    rn.add_argument('--batch-size', type=int, default=256)
    rn.add_argument('--weight-decay', type=float, default=5e-5)
    rn.add_argument('--device', default='cuda')
    rn.add_argument('--deadline', type=float, default=570.0, help='start no run after this many seconds')
    args = p.parse_args(argv)
    if args.command == 'pack':
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for shard in pack(args.data_dir, args.out, shard_mb=args.shard_mb):
            print(shard, f'{shard.stat().st_size / 1e6:.1f} MB')
        return
    from imagenette_study import FIELDS, done_runs  # the study's row format and bookkeeping

    begin = time.perf_counter()
    device = torch.device(args.device)
    data, num_classes = load(args.tars, device)
    done = done_runs(args.csv)
    for seed in args.seeds:
        for family in args.families:
            for spec in args.models or FAMILIES[family]:
                if spec not in FAMILIES[family] or (spec, seed, recipe_string(family, args)) in done:
                    continue
                if time.perf_counter() - begin > args.deadline:
                    print('deadline reached; rerun to continue')
                    return
                row = train_one(spec, family, seed, data, num_classes, args)
                new = not args.csv.is_file()
                with open(args.csv, 'a', newline='') as f:
                    writer = csv.DictWriter(f, fieldnames=FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                print(f'{spec} seed {seed}: top-1 {row["top1"]} in {row["train_minutes"]} min', flush=True)


if __name__ == '__main__':
    main()
