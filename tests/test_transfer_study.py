"""lab/transfer_study.py and lab/summarize_transfer.py on tiny synthetic inputs: the class-balanced subsets, what is
left to run, the train.py command of each arm, and the summary's statistics."""

import csv
from pathlib import Path

import pytest

from tests.helpers import load_script, make_image_folder

pytest.importorskip('scipy')


@pytest.fixture(scope='module')
def study():
    return load_script('transfer_study')


@pytest.fixture(scope='module')
def summarize():
    return load_script('summarize_transfer')


def test_subsets_are_class_balanced_fixed_by_the_seed_and_link_the_photos(study, tmp_path):
    root = make_image_folder(tmp_path / 'data', classes=3, per_class=6, size=16)
    (root / 'val').mkdir(exist_ok=True)
    subsets = [study.class_balanced_subset(root / 'train', 2, seed, tmp_path / f's{seed}') for seed in (0, 0, 1)]
    picks = [sorted(str(p.relative_to(s / 'train')) for p in (s / 'train').rglob('*.*')) for s in subsets]
    assert picks[0] == picks[1] != picks[2]  # the same seed draws the same images, another seed others
    assert [len(list(d.iterdir())) for d in sorted((subsets[0] / 'train').iterdir())] == [2, 2, 2]
    assert all(p.is_symlink() and p.resolve().is_file() for p in (subsets[0] / 'train').rglob('*.*'))
    assert (subsets[0] / 'val').resolve() == (root / 'val').resolve()
    with pytest.raises(ValueError, match='has 6 images, fewer than 7'):
        study.class_balanced_subset(root / 'train', 7, 0, tmp_path / 'too_many')


def test_each_arm_is_the_backbone_or_timms_nam_model_with_its_kwargs(study):
    assert study.model_args('efficientnet_lite1', 'plain') == ['--model', 'efficientnet_lite1']
    assert study.model_args('efficientnet_lite1', 'nam_every') == [
        '--model', 'nam', '--model-kwargs', 'base=efficientnet_lite1', 'blocks_without_skip=True', 'nam_penalty=paper',
    ]  # fmt: skip
    assert study.model_args('resnet50', 'half') == ['--model', 'nam', '--model-kwargs', 'base=resnet50', 'kind=half']
    assert study.penalty_p('efficientnet_lite0', 'nam') == 1e-3 and study.penalty_p('resnet18', 'nam') == 1e-4
    assert study.penalty_p('efficientnet_lite0', 'nam_p0') == 0.0


def test_a_finished_run_is_not_planned_again(study, tmp_path):
    csv_path = tmp_path / 'runs.csv'
    args = study.argparse.Namespace(
        csv=csv_path, seeds=[0, 1], regimes=['k10'], backbones=['efficientnet_lite0'], arms=['plain', 'nam'],
        recipe=study.RECIPE, epochs=None, val_interval=None,
    )  # fmt: skip
    assert len(study.plan(args)) == 4
    row = dict.fromkeys(study.FIELDS, '') | dict(
        backbone='efficientnet_lite0', regime='k10', arm='nam', seed=1, recipe=study.regime_recipe('k10', study.RECIPE)
    )
    study.append_row(csv_path, row, study.FIELDS)
    assert ('efficientnet_lite0', 'k10', 'nam', 1) not in study.plan(args) and len(study.plan(args)) == 3
    args.epochs = 7  # another recipe: nothing of it is done
    assert len(study.plan(args)) == 4


def _write(path: Path, top1: dict, regime='k10', backbone='efficientnet_lite0') -> None:
    fields = ['backbone', 'regime', 'arm', 'seed', 'train_images', 'epochs', 'top1', 'seconds_per_epoch']
    fields += ['peak_rss_mb', 'recipe', 'machine', 'timm_nam']
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for arm, values in top1.items():
            for seed, value in enumerate(values):
                seconds = 10.0 if arm == 'plain' else 11.0
                writer.writerow(dict(backbone=backbone, regime=regime, arm=arm, seed=seed, train_images=100, epochs=50,
                                     top1=value, seconds_per_epoch=seconds, peak_rss_mb=1000, recipe='r', machine='m',
                                     timm_nam='abc'))  # fmt: skip


def test_holm_adjusts_in_step_down_order(summarize):
    """Sorted 0.01, 0.03, 0.04 of three tests: ×3, ×2, ×1, each at least the one before."""
    adjusted = summarize.holm({'a': 0.01, 'b': 0.04, 'c': 0.03, 'd': None})
    assert adjusted['d'] is None
    assert [adjusted[k] for k in 'acb'] == pytest.approx([0.03, 0.06, 0.06])


def test_summary_compares_every_arm_with_plain_by_seed(summarize, tmp_path):
    """Hand-computed: nam − plain = +1, +2, +3 by seed: mean +2.00, paired t = 2/(1/√3) = 3.46 on 2 df, p = 0.074;
    half − plain is 0 at every seed but one."""
    csv_path = tmp_path / 'runs.csv'
    _write(csv_path, {'plain': [50.0, 52.0, 54.0], 'nam': [51.0, 54.0, 57.0], 'half': [50.0, 52.0, 55.0]})
    doc = tmp_path / 'CARD.md'
    doc.write_text('before\n<!-- transfer-table -->\nold\n<!-- /transfer-table -->\nafter\n')
    summarize.main(['--csv', str(csv_path), '--docs', str(doc)])
    text = (tmp_path / 'summary.md').read_text()
    nam_line = next(line for line in text.splitlines() if '(`nam`)' in line)
    cols = [c.strip() for c in nam_line.split('|')]
    assert cols[2] == '3' and cols[3] == '54.00 ± 3.00' and cols[4] == '+2.00'
    assert cols[7] == '0.074' and cols[9] == '1.10×'  # paired p; seconds per epoch against plain
    assert 'NAM against its control' in text and (tmp_path / 'top1.png').stat().st_size > 0
    card = doc.read_text()
    assert card.startswith('before\n<!-- transfer-table -->\n### efficientnet_lite0, k10') and 'old' not in card
