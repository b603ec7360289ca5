"""Cross-entropy and logit std of freshly initialized models on a fixed batch of training images, per seed: shows
how far from ln(num_classes) each seed's initialization starts (the Imagenette study's seed-2 collapse).

    python -m lab.initial_loss --data-dir ../shared/data/imagenette2-224 --models mobilenetv2_100 mobilenetv2_100_se
"""

import argparse
import math

import timm
import torch
from timm.data import create_dataset, create_transform

import timm_nam  # noqa: F401  (registers the models)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True, help='ImageFolder root with a train/ folder')
    p.add_argument('--models', nargs='+', default=['mobilenetv2_100'])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--images', type=int, default=256)
    args = p.parse_args()
    ds = create_dataset('', root=f'{args.data_dir}/train')
    tf = create_transform(args.img_size, is_training=False)  # timm's eval transform: resize, center crop
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.images].tolist()
    images, labels = zip(*(ds[i] for i in idx))  # one read per image
    x, y = torch.stack([tf(img.convert('RGB')) for img in images]), torch.tensor(labels)
    num_classes = len(ds.reader.class_to_idx)
    print(f'ln({num_classes}) = {math.log(num_classes):.2f}')
    for model in args.models:
        kwargs = {'img_size': args.img_size} if timm.get_pretrained_cfg_value(model, 'fixed_input_size') else {}
        for seed in args.seeds:
            torch.manual_seed(seed)
            net = timm.create_model(model, num_classes=num_classes, **kwargs).train()  # train-mode BN, as in step 1
            with torch.no_grad():
                out = net(x)
            ce = torch.nn.functional.cross_entropy(out, y).item()
            print(f'{model} seed {seed}: logit std {out.std().item():.2f}, cross-entropy {ce:.2f}')


if __name__ == '__main__':
    main()
