"""The Imagenette study at 128 px on one GPU, with the data decoded once and kept on the GPU.

    python -m lab.gpu_study pack <imagenette2-224> data128/imagenette128.tar   # 128-px JPEGs, tars of at most 60 MB
    python -m lab.gpu_study run data128/imagenette128_*.tar [--families ...] [--models ...] [--seeds ...]

``run`` decodes the packed JPEGs on the GPU once (``torchvision.io.decode_jpeg``), keeps the uint8 images there, and
trains every (model, seed) not yet in the study's CSV with the study trainer (``lab.trainer``, as ``python -m
lab.train`` does) fed from those images: the ``imagenet`` recipe at 128 px (SGD with Nesterov momentum, no weight
decay on norms and biases, cosine schedule stepped per update after a one-epoch warmup, label smoothing 0.1), batch
256, 16 epochs, bf16 autocast, channels-last, the paper's sparsity penalty on NAM models. Each epoch's order comes from
the trainer's seeded sampler and its augmentation (a random crop of the image zero-padded by 16 px, and a horizontal
flip) is drawn on the GPU from a generator seeded from (seed, epoch), so a run is reproducible and one stopped
part-way resumes from its last epoch (its directory under ``--runs-dir``). After each run its row (families
``resnet18_128`` and ``mobilenetv2_128``, grouped by their recipe string in ``lab/summarize_study.py``) is appended to
the study's CSV; ``--deadline`` stops starting runs after that many seconds.
"""

import argparse
import io
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from lab.imagenette_study import append_row, done_runs, run_dir, split_spec, study_row
from lab.trainer import TrainConfig, get_recipe, train
from lab.trainer.data import GlobalBatchSampler, TrainData

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
SIZE, PAD, VAL_BATCH = 128, 16, 500


def pack(data_dir: Path, out: Path, quality: int = 90, shard_mb: float = 60.0) -> list:
    """Resize every image to SIZE x SIZE once and write them as JPEGs (split/class/name.jpg) into tars of at most
    ``shard_mb`` MB each (``out`` with _0, _1, ... before the suffix)."""
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
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def gpu_data(data: dict, num_classes: int, seed: int, batch_size: int) -> TrainData:
    """The trainer's data from the images on the GPU: each epoch in the order of the trainer's seeded sampler,
    augmented batch by batch with a generator seeded from (seed, epoch)."""
    images, labels = data['train']
    val_images, val_labels = data['val']
    sampler = GlobalBatchSampler(images.shape[0], batch_size, seed)

    def train_batches(epoch: int):
        sampler.set_epoch(epoch)
        generator = torch.Generator(device=images.device).manual_seed(seed * 1_000_003 + epoch)
        for indices in sampler:
            indices = torch.tensor(indices, device=images.device)
            yield normalize(augment(images[indices], generator)), labels[indices]

    def val_batches():
        for i in range(0, val_images.shape[0], VAL_BATCH):
            yield normalize(val_images[i : i + VAL_BATCH]), val_labels[i : i + VAL_BATCH]

    return TrainData(train_batches, sampler.steps, val_batches, num_classes)


def train_one(spec: str, family: str, seed: int, data: dict, num_classes: int, args) -> dict:
    """Train (or finish) one run with the study trainer; returns its row."""
    name, kwargs = split_spec(spec)
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
    out = run_dir(args.runs_dir, spec, seed, recipe_string(family, args))
    device = data['train'][0].device
    cfg = TrainConfig(
        model=name,
        data_dir=' '.join(map(str, args.tars)),
        output=str(out),
        recipe=recipe,
        recipe_name='imagenet',
        model_kwargs=kwargs,
        amp=device.type == 'cuda',
        channels_last=True,
        device=args.device,
        workers=0,
        resume=str(out) if (out / 'last_state.pt').is_file() else None,
    )
    train(cfg, gpu_data(data, num_classes, seed, args.batch_size))
    return study_row(out, f'{family}_128', spec, seed, recipe_string(family, args))


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
    rn.add_argument('--runs-dir', type=Path, default=Path('runs/gpu_study'), help='run directories (not committed)')
    rn.add_argument('--families', nargs='+', default=list(FAMILIES), choices=list(FAMILIES))
    rn.add_argument('--models', nargs='+', help='only these (default: every model of the families)')
    rn.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    rn.add_argument('--epochs', type=int, default=16)
    rn.add_argument('--batch-size', type=int, default=256)
    rn.add_argument('--weight-decay', type=float, default=5e-5)
    rn.add_argument('--device', default='cuda')
    rn.add_argument('--deadline', type=float, help='start no run after this many seconds')
    args = p.parse_args(argv)
    if args.command == 'pack':
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for shard in pack(args.data_dir, args.out, shard_mb=args.shard_mb):
            print(shard, f'{shard.stat().st_size / 1e6:.1f} MB')
        return
    begin = time.perf_counter()
    device = torch.device(args.device)
    data, num_classes = load(args.tars, device)
    done = done_runs(args.csv)
    for seed in args.seeds:
        for family in args.families:
            for spec in args.models or FAMILIES[family]:
                if spec not in FAMILIES[family] or (spec, seed, recipe_string(family, args)) in done:
                    continue
                if args.deadline is not None and time.perf_counter() - begin > args.deadline:
                    print('deadline reached; rerun to continue')
                    return
                row = train_one(spec, family, seed, data, num_classes, args)
                append_row(args.csv, row)
                print(f'{spec} seed {seed}: top-1 {row["top1"]} in {row["train_minutes"]} min', flush=True)


if __name__ == '__main__':
    main()
