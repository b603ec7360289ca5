""" Hugging Face Hub form: export a trained checkpoint, generate its model card, publish, and load plain
timm backbones into NAM models.

* `export_checkpoint`: ``model.safetensors`` + ``config.json`` exactly as timm's ``save_for_hf`` writes them, a
  model card ``README.md`` generated from the run's recorded args and metrics, and those records
  (``training_args.json``, ``training_metrics.json``).
* `publish`: upload such a directory with huggingface_hub; ``dry_run`` lists what would go, offline.
* `load_backbone_weights`: timm's plain ``resnet50`` / ``mobilenetv2_100`` weights into the NAM model
  (backbone from the checkpoint, NAM layers fresh).
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models._hub import save_for_hf  # not re-exported by timm.models before 1.0.16
from timm.models._pretrained import filter_pretrained_cfg

from .flops import count_flops
from .layers import NAMChannel, NAMSpatial
from .models._cfg import HF_ORG, hub_id
from .sparsity import scale_stats
from .training.checkpoint import create_model_from_checkpoint

__all__ = ['HF_ORG', 'hub_id', 'export_checkpoint', 'render_model_card', 'publish', 'upload_plan',
           'load_backbone_weights']

REQUIRED_FILES = ('config.json', 'model.safetensors', 'README.md')
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.ckpt', '.tar')


def _label_names(data_dir: Optional[str]) -> Optional[List[str]]:
    train = Path(data_dir or '') / 'train'
    if train.is_dir():
        return sorted(p.name for p in train.iterdir() if p.is_dir())
    return None


def export_checkpoint(checkpoint, out_dir, tag: str, dataset_name: Optional[str] = None) -> Path:
    """Write the Hub layout for a ``timm-nam train`` checkpoint (its run directory supplies args/metrics)."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent
    args_file, metrics_file = run_dir / 'args.json', run_dir / 'metrics.json'
    for f in (args_file, metrics_file):
        if not f.is_file():
            raise FileNotFoundError(f'{f} is missing: export needs the run directory written by timm-nam train')
    args = json.loads(args_file.read_text())
    metrics = json.loads(metrics_file.read_text())
    model, meta = create_model_from_checkpoint(checkpoint)
    model.eval()
    name = meta['model']
    img_size = args['recipe']['img_size']
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset_name = dataset_name or Path(args['data_dir']).name
    model_config = {}
    labels = _label_names(args.get('data_dir'))
    if labels and len(labels) == model.num_classes:
        model_config['label_names'] = labels
    # The whole cfg, not only what changes: timm before 1.0.2x writes model_config['pretrained_cfg'] in place of the
    # model's cfg, later releases merge it into that cfg.
    pretrained_cfg = filter_pretrained_cfg(model.pretrained_cfg, remove_source=True, remove_null=True)
    pretrained_cfg.pop('architecture', None)
    pretrained_cfg.update({
        'hf_hub_id': hub_id(name, tag), 'tag': tag, 'input_size': (3, img_size, img_size),
        'crop_pct': 1.0 if args['recipe']['aug'] == 'cifar' else model.pretrained_cfg.get('crop_pct', 0.875),
    })
    if tuple(pretrained_cfg['input_size']) != tuple(model.pretrained_cfg['input_size']):
        pretrained_cfg.pop('pool_size', None)
    model_config['pretrained_cfg'] = pretrained_cfg
    # the input size a fixed-size model was built for (timm >= 1.0.2x records constructor args itself; older not)
    model_args = {'img_size': list(model.img_size)} if hasattr(model, 'img_size') else None
    save_for_hf(model, out_dir, model_config=model_config, model_args=model_args, safe_serialization=True)
    (out_dir / 'training_args.json').write_text(json.dumps(args, indent=1))
    (out_dir / 'training_metrics.json').write_text(json.dumps(metrics, indent=1))
    card = render_model_card(model, name, tag, args, metrics, dataset_name, Path(checkpoint).name)
    (out_dir / 'README.md').write_text(card)
    return out_dir


def _fmt(v, digits=2):
    return '—' if v is None else f'{v:.{digits}f}'


def render_model_card(model: nn.Module, name: str, tag: str, args: dict, metrics: List[dict], dataset_name: str,
                      checkpoint_name: str) -> str:
    """A Hub model card from the run's records: nothing here is typed in by hand."""
    recipe = args['recipe']
    img = recipe['img_size']
    best = max(metrics, key=lambda r: r['val_top1'])
    final = metrics[-1]
    reported = best if checkpoint_name.startswith('best') else final
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, (3, img, img))
    nam_rows = scale_stats(model) if any(isinstance(m, (NAMChannel, NAMSpatial)) for m in model.modules()) else []
    total_time = sum(r['epoch_time_s'] for r in metrics)
    hub = hub_id(name, tag)
    device = 'GPU' if 'cuda' in str(args.get('device_used', '')) else 'CPU'
    lines = [
        '---',
        'library_name: timm',
        f"license: {model.pretrained_cfg.get('license', 'apache-2.0')}",
        'pipeline_tag: image-classification',
        'tags:', '- image-classification', '- timm', '- timm-nam', '- nam', '- attention',
        'datasets:', f'- {dataset_name.lower()}',
        'metrics:', '- accuracy',
        'model-index:',
        f'- name: {name}.{tag}',
        '  results:',
        '  - task:', '      type: image-classification',
        '    dataset:', f'      name: {dataset_name}', f'      type: {dataset_name.lower()}',
        '    metrics:',
        f"    - type: accuracy\n      name: top-1 accuracy\n      value: {reported['val_top1']:.2f}",
        f"    - type: accuracy\n      name: top-5 accuracy\n      value: {reported['val_top5']:.2f}",
        '---',
        f'# Model card for {name}.{tag}',
        '',
        f'`{name}` (timm-nam) trained on {dataset_name} at {img}x{img} px. NAM (Normalization-based Attention Module, '
        'arXiv:2111.12419) gates features with their own batch-norm scales; an L1 penalty on those scales '
        f'(p = {args.get("penalty_p")}) pushes unimportant channels/pixels toward zero.',
        '',
        f'**Scale of this run:** {len(metrics)} epochs on {args.get("world_size", 1)} {device} process(es), '
        f'{total_time / 60:.1f} minutes of training. It demonstrates the pipeline; its accuracy is not comparable '
        'to the paper\'s ImageNet/CIFAR-100 results.',
        '',
        '## Model details',
        f'- **Architecture:** `{name}` — {model.__class__.__name__}, {params:,} parameters',
        f'- **FLOPs:** {flops.paper_flops / 1e9:.3f} G at {img}x{img} (conv+linear multiply-adds + 2/BN element, '
        f'the paper\'s convention); {flops.macs / 1e9:.3f} G multiply-adds only',
        f'- **Input:** {img}x{img}, mean {tuple(round(v, 4) for v in model.pretrained_cfg["mean"])}, '
        f'std {tuple(round(v, 4) for v in model.pretrained_cfg["std"])}'
        + (', fixed size (pixel attention)' if model.pretrained_cfg.get('fixed_input_size') else ''),
        f'- **Classes:** {model.num_classes}',
        f'- **Dataset:** {dataset_name} (train split for training, val split for the results below)',
        f'- **Recipe:** `{args.get("recipe_name")}` with these values (flags override the named recipe):',
        f'  - epochs {recipe["epochs"]}, global batch {recipe["batch_size"]}, opt {recipe["opt"]} (momentum '
        f'{recipe["momentum"]}), lr {recipe["lr"]}, weight decay {recipe["weight_decay"]}, schedule {recipe["sched"]}'
        f' (warmup {recipe["warmup_epochs"]} epochs), label smoothing {recipe["smoothing"]}, augmentation '
        f'{recipe["aug"]}, seed {recipe["seed"]}',
        f'  - NAM sparsity penalty p = {args.get("penalty_p")}, AMP {args.get("amp")}, EMA {args.get("model_ema")}',
        f'- **Software:** torch {args.get("torch")}, timm {args.get("timm")}',
        f'- **Weights file:** from `{checkpoint_name}` (epoch {reported["epoch"] + 1})',
        '',
        '## Results (measured on the validation split)',
        '',
        '| | epoch | top-1 | top-5 | val loss |',
        '|---|---:|---:|---:|---:|',
        f"| these weights | {reported['epoch'] + 1} | {reported['val_top1']:.2f} | {reported['val_top5']:.2f} | "
        f"{reported['val_loss']:.4f} |",
        f"| best epoch | {best['epoch'] + 1} | {best['val_top1']:.2f} | {best['val_top5']:.2f} | {best['val_loss']:.4f} |",
        f"| final epoch | {final['epoch'] + 1} | {final['val_top1']:.2f} | {final['val_top5']:.2f} | "
        f"{final['val_loss']:.4f} |",
        '',
        '<details><summary>Per-epoch metrics</summary>',
        '',
        '| epoch | lr | train loss | penalty | train top-1 | val top-1 | val top-5 | img/s |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in metrics:
        lines.append(f"| {r['epoch'] + 1} | {r['lr']:.4g} | {r['train_loss']:.4f} | {r['train_penalty']:.4f} | "
                     f"{r['train_top1']:.2f} | {r['val_top1']:.2f} | {r['val_top5']:.2f} | {r['img_per_s']:.0f} |")
    lines += ['', '</details>', '']
    if nam_rows:
        for kind in ('channel γ', 'pixel λ'):
            vals = torch.tensor([v for r in nam_rows if r['kind'] == kind for v in r['values']])
            if vals.numel():
                lines.append(f'- NAM {kind}: {vals.numel():,} scales, median |{kind[-1]}| {vals.median():.4f}, '
                             f'{(vals < 1e-2).float().mean() * 100:.1f}% below 0.01')
        lines.append('')
    lines += [
        '## How to use',
        '',
        '```python',
        'import timm  # with timm-nam installed (pip install timm-nam)',
        f"model = timm.create_model('hf-hub:{hub}', pretrained=True).eval()",
        f"# releases of timm-nam after this upload also register it as timm.create_model('{name}.{tag}', ...)",
        'cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**cfg)',
        '```',
        '',
        '## Citation',
        '',
        '```bibtex',
        '@article{liu2021nam,',
        '  title={NAM: Normalization-based Attention Module},',
        '  author={Liu, Yichao and Shao, Zongru and Teng, Yueyang and Hoffmann, Nico},',
        '  journal={arXiv preprint arXiv:2111.12419},',
        '  year={2021}',
        '}',
        '```',
        '',
    ]
    return '\n'.join(lines)


def upload_plan(folder) -> List[Dict]:
    """The files ``publish`` would upload, with sizes and sha256; refuses incomplete or pickled exports."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'No export directory at {folder}')
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not an export: missing {", ".join(missing)} (run timm-nam export)')
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(f'{folder} contains pickle files ({", ".join(pickled)}): only safetensors weights are published')
    return [{'path': str(p.relative_to(folder)), 'bytes': p.stat().st_size,
             'sha256': hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]


def default_repo_id(folder) -> str:
    config = json.loads((Path(folder) / 'config.json').read_text())
    hf_id = config.get('pretrained_cfg', {}).get('hf_hub_id')
    if not hf_id:
        raise ValueError(f'{folder}/config.json has no pretrained_cfg.hf_hub_id: pass REPO_ID')
    return hf_id


def publish(folder, repo_id: Optional[str] = None, dry_run: bool = False, token: Optional[str] = None,
            private: bool = False) -> List[Dict]:
    """Upload an export to the Hub (token: argument, else huggingface_hub's login / HF_TOKEN)."""
    plan = upload_plan(folder)
    repo_id = repo_id or default_repo_id(folder)
    if dry_run:
        return plan
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message='Upload timm-nam model',
                      allow_patterns=[f['path'] for f in plan])
    return plan


def _read_state_dict(source: Union[str, Path, dict]) -> Dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_file():
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location='cpu', weights_only=True)
        return state.get('state_dict', state) if isinstance(state, dict) else state
    if timm.is_model(str(source)):  # a timm model name: its pretrained weights (downloads unless cached)
        return timm.create_model(str(source), pretrained=True).state_dict()
    raise FileNotFoundError(f'{source} is neither a checkpoint file nor a timm model name')


def load_backbone_weights(model: nn.Module, source: Union[str, Path, dict]) -> Dict[str, List[str]]:
    """Load a plain timm backbone (e.g. timm's ``resnet50`` or ``mobilenetv2_100`` weights) into a NAM model.

    Every backbone tensor must be present with the right shape; the NAM layers keep their fresh init, and a
    classifier whose class count differs is left as initialized. Returns what was loaded and what was not.
    """
    state = _read_state_dict(source)
    own = model.state_dict()
    nam_prefixes = tuple(f'{n}.' for n, m in model.named_modules() if isinstance(m, (NAMChannel, NAMSpatial)))
    classifier = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
    classifier_keys = {f'{classifier}.weight', f'{classifier}.bias'} if classifier else set()
    loaded, skipped_head, problems = {}, [], []
    for key, tensor in own.items():
        if key.startswith(nam_prefixes):
            continue
        if key not in state:
            if key.endswith('num_batches_tracked'):
                continue
            problems.append(f'missing {key}')
        elif state[key].shape != tensor.shape:
            if key in classifier_keys:
                skipped_head.append(key)
            else:
                problems.append(f'shape of {key}: checkpoint {tuple(state[key].shape)}, model {tuple(tensor.shape)}')
        else:
            loaded[key] = state[key]
    extra = sorted(set(state) - set(own))
    problems += [f'unexpected {k}' for k in extra]
    if problems:
        shown = '; '.join(problems[:6]) + (f' (+{len(problems) - 6} more)' if len(problems) > 6 else '')
        raise ValueError(f'checkpoint does not fit the backbone of {type(model).__name__}: {shown}')
    model.load_state_dict(loaded, strict=False)
    return {'loaded': sorted(loaded), 'nam_fresh': sorted(k for k in own if k.startswith(nam_prefixes)),
            'classifier_skipped': skipped_head}
