"""How exactly plain weights convert to NAM (timm_nam.convert): the measurements behind results/pretrained_conversion/.

    # a plain network trained on Imagenette (lab.train run directory), on the full val split
    python -m lab.conversion_error trained --run runs/resnet18_s0 --data-dir ../shared/data/imagenette2-224
    # every pretrained tag's architecture, random weights with the tests' batch-norm states, real photos at 224 px
    python -m lab.conversion_error tags --data-dir ../shared/data/imagenette2-224
    # add_nam on timm's families
    python -m lab.conversion_error families --data-dir ../shared/data/imagenette2-224

Each writes a CSV into --out (default results/pretrained_conversion/) and prints it. The error is the relative L2
difference of the logits of the NAM network from the plain one's, in eval mode.
"""

import argparse
import csv
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader

import timm_nam
from tests.helpers import bn_states_  # the conversion tests' batch-norm states
from timm_nam.convert import add_nam, load_plain_weights
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
        for scale in args.scales:
            nam = timm.create_model(nam_arch, num_classes=meta['num_classes'], nam_weighting=weighting)
            load_plain_weights(nam, plain, scale_init=scale)
            rows.append(
                dict(plain=arch, nam=nam_arch, weighting=weighting, scale_init=scale, img_size=img_size)
                | {k: round(v, 6) for k, v in _compare(plain, nam.eval(), loader).items()}
            )
    _write(rows, Path(args.out) / f'trained_{arch}.csv')


def cmd_tags(args):
    tagged = sorted(
        n
        for n in timm.list_models(module=['resnet_nam', 'mobilenetv2_nam', 'efficientnet_nam'])
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
        for scale in args.scales:
            nam = load_plain_weights(timm.create_model(name), plain, scale_init=scale).eval()
            result = _compare(plain, nam, loader)
            rows.append(
                dict(model=name, plain=plain_arch, scale_init=scale)
                | {k: round(result[k], 6) for k in ('rel_error', 'top1_agreement', 'images')}
            )
            print(rows[-1], flush=True)
    _write(rows, Path(args.out) / 'tags_random.csv')


FAMILIES = {
    'ResNet': 'resnet18',
    'ResNet-D': 'resnet26d',
    'ResNeXt': 'resnext50_32x4d',
    'wide ResNet': 'wide_resnet50_2',
    'SE-ResNet': 'seresnet18',
    'RegNetX': 'regnetx_002',
    'RegNetY': 'regnety_002',
    'MobileNetV2': 'mobilenetv2_050',
    'MobileNetV3': 'mobilenetv3_small_050',
    'EfficientNet': 'efficientnet_b0',
    'EfficientNetV2': 'tf_efficientnetv2_b0',
    'EfficientNetV2 (rw)': 'efficientnetv2_rw_t',
    'CSPResNet': 'cspresnet50',
    'CSPResNeXt': 'cspresnext50',
    'CSPDarknet': 'cspdarknet53',
    'CS3Darknet': 'cs3darknet_s',
    'Darknet': 'darknet17',
    'MobileNetV4': 'mobilenetv4_conv_small',
    'ResNeXt (BYOB)': 'resnext26ts',
    'DenseNet': 'densenet121',
    'ConvNeXt': 'convnext_atto',
    'ViT': 'vit_tiny_patch16_224',
}


def cmd_families(args):
    rows = []
    for family, arch in FAMILIES.items():
        torch.manual_seed(0)
        plain = timm.create_model(arch)
        loader = _loader(args.data_dir, plain, 224, limit=args.images)
        try:
            calibration = next(iter(_loader(args.data_dir, plain, 224, limit=64)))[0]
            bn_states_(plain, calibration)
        except ValueError:  # no batch norm to give states to
            pass
        nam = timm.create_model(arch)
        nam.load_state_dict(plain.state_dict())
        try:
            add_nam(nam)
        except ValueError as e:
            rows.append(dict(family=family, model=arch, gates='', rel_error='', top1_agreement='', result=str(e)))
            print(rows[-1], flush=True)
            continue
        result = _compare(plain, nam.eval(), loader)
        rows.append(
            dict(
                family=family,
                model=arch,
                gates=len(timm_nam.nam_scales(nam)),
                rel_error=round(result['rel_error'], 6),
                top1_agreement=round(result['top1_agreement'], 2),
                result='works',
            )
        )
        print(rows[-1], flush=True)
    _write(rows, Path(args.out) / 'families.csv')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    for name, fn in (('trained', cmd_trained), ('tags', cmd_tags), ('families', cmd_families)):
        q = sub.add_parser(name)
        q.add_argument('--data-dir', required=True)
        q.add_argument('--out', default='results/pretrained_conversion')
        q.add_argument('--images', type=int, default=256, help='val images for the random-weight tables')
        q.add_argument('--scales', type=float, nargs='+', default=[1.0, 0.5, 0.25], help="NAM's initial scales")
        q.set_defaults(func=fn)
        if name == 'trained':
            q.add_argument('--run', required=True, help='a lab.train run directory of a plain model')
            q.add_argument('--nam', help="the NAM model to convert to (default '<model>_nam')")
    args = p.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
