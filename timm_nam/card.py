"""The Hub model card of a ``timm-nam train`` run: its metadata through huggingface_hub's `ModelCardData`, its text
from the run's records (args.json, metrics.json) and the model itself; nothing in it is typed in by hand."""

from string import Template
from typing import List

import torch
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .flops import count_flops
from .layers import NAMChannel, NAMSpatial
from .models._cfg import hub_id
from .sparsity import scale_stats

__all__ = ['render_model_card']

TAGS = ['image-classification', 'timm', 'timm-nam', 'nam', 'attention']

# string.Template: the card's code blocks are full of the braces str.format would need escaped
CARD_TEXT = Template("""\
# Model card for $repo_name

`$name` (timm-nam) trained on $dataset_name at ${img}x${img} px. NAM (Normalization-based Attention Module, \
arXiv:2111.12419) gates features with their own batch-norm scales; an L1 penalty on those scales (p = $penalty_p) \
pushes unimportant channels/pixels toward zero.

**Scale of this run:** $num_epochs epochs on $world_size $device process(es), $minutes minutes of training. It \
demonstrates the pipeline; its accuracy is not comparable to the paper's ImageNet/CIFAR-100 results.

## Model details
- **Architecture:** `$name` — $model_class, $params parameters
- **FLOPs:** $paper_gflops G at ${img}x${img} (conv+linear multiply-adds + 2/BN element, the paper's convention); \
$gmacs G multiply-adds only
- **Input:** ${img}x${img}, mean $mean, std $std$fixed_size
- **Classes:** $num_classes
- **Dataset:** $dataset_name (train split for training, val split for the results below)
- **Recipe:** `$recipe_name` with these values (flags override the named recipe):
  - epochs $epochs, global batch $batch_size, opt $opt (momentum $momentum), lr $lr, weight decay $weight_decay, \
schedule $sched (warmup $warmup_epochs epochs), label smoothing $smoothing, augmentation $aug, seed $seed
  - NAM sparsity penalty p = $penalty_p, AMP $amp, EMA $model_ema
- **Software:** torch $torch_version, timm $timm_version
- **Weights file:** from `$checkpoint_name` (epoch $reported_epoch)

## Results (measured on the validation split)

| | epoch | top-1 | top-5 | val loss |
|---|---:|---:|---:|---:|
$results

<details><summary>Per-epoch metrics</summary>

| epoch | lr | train loss | penalty | train top-1 | val top-1 | val top-5 | img/s |
|---:|---:|---:|---:|---:|---:|---:|---:|
$epochs_table

</details>
$nam_summary
## How to use

```python
import timm  # with timm-nam installed (pip install timm-nam)
model = timm.create_model('hf-hub:$repo', pretrained=True).eval()
# releases of timm-nam after this upload also register it as timm.create_model('$repo_name', ...)
cfg = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**cfg)
```

## Citation

```bibtex
@article{liu2021nam,
  title={NAM: Normalization-based Attention Module},
  author={Liu, Yichao and Shao, Zongru and Teng, Yueyang and Hoffmann, Nico},
  journal={arXiv preprint arXiv:2111.12419},
  year={2021}
}
```
""")


def render_model_card(
    model: nn.Module, name: str, tag: str, args: dict, metrics: List[dict], dataset_name: str, checkpoint_name: str
) -> str:
    """The README.md of an export: YAML metadata (model-index with the reported accuracy) and the card's text."""
    best = max(metrics, key=lambda r: r['val_top1'])
    final = metrics[-1]
    reported = best if checkpoint_name.startswith('best') else final
    data = ModelCardData(
        library_name='timm',
        license=model.pretrained_cfg.get('license', 'apache-2.0'),
        pipeline_tag='image-classification',
        tags=TAGS,
        datasets=[dataset_name.lower()],
        metrics=['accuracy'],
        model_name=f'{name}.{tag}',
        eval_results=[
            EvalResult(
                task_type='image-classification',
                dataset_type=dataset_name.lower(),
                dataset_name=dataset_name,
                metric_type='accuracy',
                metric_name=f'top-{k} accuracy',
                metric_value=round(reported[f'val_top{k}'], 2),
            )
            for k in (1, 5)
        ],
    )
    text = CARD_TEXT.substitute(
        _card_fields(model, name, tag, args, metrics, dataset_name, checkpoint_name, reported, best, final)
    )
    return str(ModelCard(f'---\n{data.to_yaml()}\n---\n{text}'))


def _card_fields(model, name, tag, args, metrics, dataset_name, checkpoint_name, reported, best, final) -> dict:
    recipe = args['recipe']
    img = recipe['img_size']
    flops = count_flops(model, (3, img, img))
    cfg = model.pretrained_cfg
    return dict(
        recipe,
        repo=hub_id(name, tag),
        repo_name=f'{name}.{tag}',
        name=name,
        dataset_name=dataset_name,
        img=img,
        penalty_p=args.get('penalty_p'),
        num_epochs=len(metrics),
        world_size=args.get('world_size', 1),
        device='GPU' if 'cuda' in str(args.get('device_used', '')) else 'CPU',
        minutes=f'{sum(r["epoch_time_s"] for r in metrics) / 60:.1f}',
        model_class=type(model).__name__,
        params=f'{sum(p.numel() for p in model.parameters()):,}',
        paper_gflops=f'{flops.paper_flops / 1e9:.3f}',
        gmacs=f'{flops.macs / 1e9:.3f}',
        mean=tuple(round(v, 4) for v in cfg['mean']),
        std=tuple(round(v, 4) for v in cfg['std']),
        fixed_size=', fixed size (pixel attention)' if cfg.get('fixed_input_size') else '',
        num_classes=model.num_classes,
        recipe_name=args.get('recipe_name'),
        amp=args.get('amp'),
        model_ema=args.get('model_ema'),
        torch_version=args.get('torch'),
        timm_version=args.get('timm'),
        checkpoint_name=checkpoint_name,
        reported_epoch=reported['epoch'] + 1,
        results='\n'.join(
            f'| {label} | {r["epoch"] + 1} | {r["val_top1"]:.2f} | {r["val_top5"]:.2f} | {r["val_loss"]:.4f} |'
            for label, r in (('these weights', reported), ('best epoch', best), ('final epoch', final))
        ),
        epochs_table='\n'.join(
            f'| {r["epoch"] + 1} | {r["lr"]:.4g} | {r["train_loss"]:.4f} | {r["train_penalty"]:.4f} | '
            f'{r["train_top1"]:.2f} | {r["val_top1"]:.2f} | {r["val_top5"]:.2f} | {r["img_per_s"]:.0f} |'
            for r in metrics
        ),
        nam_summary=_nam_summary(model),
    )


def _nam_summary(model: nn.Module) -> str:
    """One line per kind of NAM scale: how many, their median and how many the penalty drove below 0.01."""
    if not any(isinstance(m, (NAMChannel, NAMSpatial)) for m in model.modules()):
        return ''
    rows = scale_stats(model)
    lines = []
    for kind in ('channel γ', 'pixel λ'):
        values = torch.tensor([v for r in rows if r['kind'] == kind for v in r['values']])
        if values.numel():
            lines.append(
                f'- NAM {kind}: {values.numel():,} scales, median |{kind[-1]}| {values.median():.4f}, '
                f'{(values < 1e-2).float().mean() * 100:.1f}% below 0.01'
            )
    return '\n' + '\n'.join(lines) + '\n'
