"""Hugging Face Hub form: export a model trained with timm's ``train.py`` and publish it.

* `export_run`: ``model.safetensors`` + ``config.json`` exactly as timm's ``save_for_hf`` writes them, a model card
  ``README.md`` (`timm_nam.card`) generated from the run's ``args.yaml`` and ``summary.csv``, and those records.
* `publish`: upload such a directory with huggingface_hub; ``dry_run`` lists what would go, offline.
"""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Dict, List, Optional

from timm.models import save_for_hf
from timm.models._pretrained import filter_pretrained_cfg

from .card import render_model_card
from .models._cfg import HF_ORG, hub_id
from .train_run import create_model_from_run, read_run

__all__ = [
    'HF_ORG',
    'hub_id',
    'export_run',
    'render_model_card',
    'publish',
    'upload_plan',
]

REQUIRED_FILES = ('config.json', 'model.safetensors', 'README.md')
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.ckpt', '.tar')
RECORDS = ('args.yaml', 'summary.csv')
# train.py model kwargs that are not the network: the penalty (a training setting) and where weights came from
_NOT_ARCHITECTURE = ('nam_penalty', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


def _label_names(data_dir: Optional[str]) -> Optional[List[str]]:
    train = Path(data_dir or '') / 'train'
    if train.is_dir():
        return sorted(p.name for p in train.iterdir() if p.is_dir())
    return None


def export_run(run_path, out_dir, tag: str, dataset_name: Optional[str] = None, ema: bool = False) -> Path:
    """Write the Hub layout for a model trained by timm's ``train.py``: ``run_path`` is its output directory (which
    stands for its model_best.pth.tar, else last.pth.tar) or a checkpoint file in it; ``ema`` exports the EMA
    weights. The config records the input size the run trained at."""
    run = read_run(run_path)
    model = create_model_from_run(run, ema=ema)
    name = run.model_name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = run.args.get('data_dir') or run.args.get('data')
    dataset_name = dataset_name or Path(data_dir or 'unknown').name
    model_config = {}
    labels = _label_names(data_dir)
    if labels and len(labels) == model.num_classes:
        model_config['label_names'] = labels
    # The whole cfg, given both ways: timm before 1.0.31 writes model_config['pretrained_cfg'] in place of the model's
    # cfg, later releases merge it into the model's.
    pretrained_cfg = filter_pretrained_cfg(model.pretrained_cfg, remove_source=True, remove_null=True)
    for key in ('architecture', 'notes', 'test_input_size', 'test_crop_pct'):  # facts of other weights
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(hf_hub_id=hub_id(name, tag), tag=tag, num_classes=model.num_classes)
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if run.args.get(key) is not None:
            pretrained_cfg[key] = tuple(run.args[key]) if isinstance(run.args[key], list) else run.args[key]
    if run.input_size and tuple(run.input_size) != tuple(pretrained_cfg['input_size']):
        pretrained_cfg['input_size'] = tuple(run.input_size)
        pretrained_cfg.pop('pool_size', None)
    model_config['pretrained_cfg'] = pretrained_cfg
    # newer timm merge into it; the architecture builds the model again with the recorded model_args (base=...)
    model.pretrained_cfg = model.default_cfg = dict(pretrained_cfg, architecture=run.args['model'])
    # what builds the same network again (base=... for the model 'nam'; timm before 1.0.31 records none of it), and
    # the input size a fixed-size model (pixel attention) was built for; the others take any size
    model_args = {k: v for k, v in (run.args.get('model_kwargs') or {}).items() if k not in _NOT_ARCHITECTURE}
    if pretrained_cfg.get('fixed_input_size'):
        model_args['img_size'] = list(pretrained_cfg['input_size'][-2:])
    save_for_hf(model, out_dir, model_config=model_config, model_args=model_args or None, safe_serialization=True)
    # safetensors writes its file 0600; it gets the permissions of the export's other files (the umask's)
    os.chmod(out_dir / 'model.safetensors', stat.S_IMODE((out_dir / 'config.json').stat().st_mode))
    for record in RECORDS:
        shutil.copyfile(run.directory / record, out_dir / record)
    card = render_model_card(model, name, tag, run, dataset_name)
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
