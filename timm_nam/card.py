"""The Hub model card of a model trained with timm's ``train.py``: its metadata through huggingface_hub's
`ModelCardData`, its text from the run's records (``args.yaml``, ``summary.csv``) and the model itself; nothing in it
is typed in by hand."""

from string import Template

import torch
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .flops import count_flops
from .layers import NAMChannel, NAMSpatial
from .models._cfg import hub_id
from .sparsity import scale_stats
from .train_run import TrainRun

__all__ = ['render_model_card']

TAGS = ['image-classification', 'timm', 'timm-nam', 'nam', 'attention']

# string.Template: the card's code blocks are full of the braces str.format would need escaped
CARD_TEXT = Template("""\
# Model card for $repo_name

`$name` (timm-nam) trained on $dataset_name at ${img}x${img} px with timm's `train.py`. NAM (Normalization-based \
Attention Module, arXiv:2111.12419) gates features with their own batch-norm scales; an L1 penalty on those scales \
(p = $penalty_p) pushes unimportant channels/pixels toward zero.

**Scale of this run:** $num_epochs epochs. Its accuracy is not comparable to the paper's ImageNet/CIFAR-100 results \
unless the recipe below is theirs.

## Model details
- **Architecture:** `$name` — $model_class, $params parameters
- **FLOPs:** $paper_gflops G at ${img}x${img} (conv+linear multiply-adds + 2/BN element, the paper's convention); \
$gmacs G multiply-adds only
- **Input:** ${img}x${img}, mean $mean, std $std$fixed_size
- **Classes:** $num_classes
- **Dataset:** $dataset_name (train split for training, validation split for the results below)
- **Recipe** (train.py's arguments, all in `args.yaml`): epochs $epochs, batch $batch_size, opt $opt \
(momentum $momentum), lr $lr, weight decay $weight_decay, schedule $sched (warmup $warmup_epochs epochs), label \
smoothing $smoothing, seed $seed, AMP $amp, EMA $model_ema; NAM sparsity penalty p = $penalty_p
- **Weights file:** from `$checkpoint_name`

## Results (measured on the validation split)

| | epoch | top-1 | top-5 | val loss |
|---|---:|---:|---:|---:|
$results

<details><summary>Per-epoch metrics (summary.csv)</summary>

| epoch | lr | train loss | val loss | val top-1 | val top-5 |
|---:|---:|---:|---:|---:|---:|
$epochs_table

</details>
$nam_summary
## How to use

```python
import timm  # with timm-nam installed (pip install timm-nam)
model = timm.create_model('hf-hub:$repo', pretrained=True).eval()
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


def render_model_card(model: nn.Module, name: str, tag: str, run: TrainRun, dataset_name: str) -> str:
    """The README.md of an export: YAML metadata (model-index with the reported accuracy) and the card's text."""
    rows = [r for r in run.summary if 'eval_top1' in r]
    if not rows:
        raise ValueError(f'{run.directory / "summary.csv"} has no evaluated epoch (eval_top1) to report')
    best = max(rows, key=lambda r: r['eval_top1'])
    reported = _reported_epoch(run, rows, best)
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
                metric_value=round(reported[f'eval_top{k}'], 2),
            )
            for k in (1, 5)
        ],
    )
    text = CARD_TEXT.substitute(_card_fields(model, name, tag, run, dataset_name, rows, reported, best))
    return str(ModelCard(f'---\n{data.to_yaml()}\n---\n{text}'))


def _reported_epoch(run: TrainRun, rows, best):
    """The summary row of the epoch the exported checkpoint holds: the best, the last, or checkpoint-N's."""
    stem = run.checkpoint.name.split('.')[0]
    if stem == 'model_best':
        return best
    if stem.startswith('checkpoint-') and stem[len('checkpoint-') :].isdigit():
        epoch = int(stem[len('checkpoint-') :])
        return next((r for r in rows if int(r['epoch']) == epoch), rows[-1])
    return rows[-1]


def _card_fields(model, name, tag, run: TrainRun, dataset_name, rows, reported, best) -> dict:
    args = run.args
    img = model.pretrained_cfg['input_size'][-1] if run.input_size is None else run.input_size[-1]
    flops = count_flops(model, (3, img, img))
    cfg = model.pretrained_cfg
    recipe = ('epochs', 'batch_size', 'opt', 'momentum', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'smoothing')
    return dict(
        {k: args.get(k) for k in recipe + ('seed', 'amp', 'model_ema')},
        repo=hub_id(name, tag),
        repo_name=f'{name}.{tag}',
        name=name,
        dataset_name=dataset_name,
        img=img,
        penalty_p=(args.get('model_kwargs') or {}).get('nam_penalty', 0),
        num_epochs=len(run.summary),
        model_class=type(model).__name__,
        params=f'{sum(p.numel() for p in model.parameters()):,}',
        paper_gflops=f'{flops.paper_flops / 1e9:.3f}',
        gmacs=f'{flops.macs / 1e9:.3f}',
        mean=tuple(round(v, 4) for v in cfg['mean']),
        std=tuple(round(v, 4) for v in cfg['std']),
        fixed_size=', fixed size (pixel attention)' if cfg.get('fixed_input_size') else '',
        num_classes=model.num_classes,
        checkpoint_name=run.checkpoint.name,
        results='\n'.join(
            f'| {label} | {int(r["epoch"]) + 1} | {r["eval_top1"]:.2f} | {r["eval_top5"]:.2f} | {r["eval_loss"]:.4f} |'
            for label, r in (('these weights', reported), ('best epoch', best), ('final epoch', rows[-1]))
        ),
        epochs_table='\n'.join(
            f'| {int(r["epoch"]) + 1} | {r.get("lr", float("nan")):.4g} | {r["train_loss"]:.4f} | '
            f'{r["eval_loss"]:.4f} | {r["eval_top1"]:.2f} | {r["eval_top5"]:.2f} |'
            for r in rows
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
