"""Hugging Face Hub form: export a trained checkpoint and publish it.

* `export_checkpoint`: ``model.safetensors`` + ``config.json`` exactly as timm's ``save_for_hf`` writes them, a
  model card ``README.md`` (`timm_nam.card`) generated from the run's recorded args and metrics, and those records
  (``training_args.json``, ``training_metrics.json``).
* `publish`: upload such a directory with huggingface_hub; ``dry_run`` lists what would go, offline.

The training package is imported only by `export_checkpoint`, which reads its checkpoints.
"""

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Dict, List, Optional

from timm.models._hub import save_for_hf  # not re-exported by timm.models before 1.0.16
from timm.models._pretrained import filter_pretrained_cfg

from .card import render_model_card
from .models._cfg import HF_ORG, hub_id

__all__ = [
    'HF_ORG',
    'hub_id',
    'export_checkpoint',
    'render_model_card',
    'publish',
    'upload_plan',
]

REQUIRED_FILES = ('config.json', 'model.safetensors', 'README.md')
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.ckpt', '.tar')


def _label_names(data_dir: Optional[str]) -> Optional[List[str]]:
    train = Path(data_dir or '') / 'train'
    if train.is_dir():
        return sorted(p.name for p in train.iterdir() if p.is_dir())
    return None


def export_checkpoint(checkpoint, out_dir, tag: str, dataset_name: Optional[str] = None) -> Path:
    """Write the Hub layout for a ``timm-nam train`` checkpoint, or a run directory's last.safetensors (the run
    directory supplies args/metrics)."""
    from .training.checkpoint import create_model_from_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
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
    pretrained_cfg.update(
        {
            'hf_hub_id': hub_id(name, tag),
            'tag': tag,
            'input_size': (3, img_size, img_size),
            'crop_pct': 1.0 if args['recipe']['aug'] == 'cifar' else model.pretrained_cfg.get('crop_pct', 0.875),
        }
    )
    if tuple(pretrained_cfg['input_size']) != tuple(model.pretrained_cfg['input_size']):
        pretrained_cfg.pop('pool_size', None)
    model_config['pretrained_cfg'] = pretrained_cfg
    # the input size a fixed-size model was built for (timm >= 1.0.2x records constructor args itself; older not)
    model_args = {'img_size': list(model.img_size)} if hasattr(model, 'img_size') else None
    save_for_hf(model, out_dir, model_config=model_config, model_args=model_args, safe_serialization=True)
    # safetensors writes its file 0600; it gets the permissions of the export's other files (the umask's)
    os.chmod(out_dir / 'model.safetensors', stat.S_IMODE((out_dir / 'config.json').stat().st_mode))
    (out_dir / 'training_args.json').write_text(json.dumps(args, indent=1))
    (out_dir / 'training_metrics.json').write_text(json.dumps(metrics, indent=1))
    card = render_model_card(model, name, tag, args, metrics, dataset_name, checkpoint.name)
    (out_dir / 'README.md').write_text(card)
    return out_dir


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
        raise ValueError(
            f'{folder} contains pickle files ({", ".join(pickled)}): only safetensors weights are published'
        )
    return [
        {
            'path': str(p.relative_to(folder)),
            'bytes': p.stat().st_size,
            'sha256': hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in files
    ]


def default_repo_id(folder) -> str:
    config = json.loads((Path(folder) / 'config.json').read_text())
    hf_id = config.get('pretrained_cfg', {}).get('hf_hub_id')
    if not hf_id:
        raise ValueError(f'{folder}/config.json has no pretrained_cfg.hf_hub_id: pass REPO_ID')
    return hf_id


def publish(
    folder, repo_id: Optional[str] = None, dry_run: bool = False, token: Optional[str] = None, private: bool = False
) -> List[Dict]:
    """Upload an export to the Hub (token: argument, else huggingface_hub's login / HF_TOKEN)."""
    plan = upload_plan(folder)
    repo_id = repo_id or default_repo_id(folder)
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message='Upload timm-nam model',
        allow_patterns=[f['path'] for f in plan],
    )
    return plan
