"""lab/summarize_study.py: the study's numbers as MODEL_CARD quotes them."""

import csv
from pathlib import Path

import pytest

from tests.helpers import load_script

pytest.importorskip('scipy')
FIELDS = ['family', 'model', 'seed', 'recipe', 'top1', 'top5', 'params', 'flops_g', 'train_img_s']


@pytest.fixture(scope='module')
def summarize():
    return load_script('summarize_study')


def write_runs(path: Path, top1_by_model: dict, recipe='--img-size 64', append=False) -> None:
    with open(path, 'a' if append else 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if not append:
            writer.writeheader()
        for model, values in top1_by_model.items():
            for seed, top1 in enumerate(values):
                writer.writerow(
                    dict(
                        family='mobilenetv2',
                        model=model,
                        seed=seed,
                        recipe=recipe,
                        top1=top1,
                        top5=top1 + 40,
                        params=2_240_000,
                        flops_g=0.026,
                        train_img_s=100,
                    )
                )


def test_summary_tables_and_docs(summarize, tmp_path):
    runs = tmp_path / 'runs.csv'
    write_runs(
        runs,
        {
            'mobilenetv2_100': [40.0, 41.0, 42.0],
            'mobilenetv2_100_se': [40.0],
            'mobilenetv2_100_nam': [44.0, 46.0, 45.0],
        },
    )
    doc = tmp_path / 'README.md'
    doc.write_text('intro\n<!-- study-table -->\nold numbers\n<!-- /study-table -->\noutro\n')
    summarize.main(['--csv', str(runs), '--docs', str(doc)])

    summary = (tmp_path / 'summary.md').read_text()
    assert (
        '| mobilenetv2 | `mobilenetv2_100` | 3 | 41.00 ± 1.00 | 81.00 ± 1.00 | 2.24M | 0.026G @64 px | 100 |' in summary
    )
    assert '| mobilenetv2 | `mobilenetv2_100_se` | 1 | 40.00 | 80.00 |' in summary
    # NAM 45 ± 1 vs base 41 ± 1, 3 seeds each: Welch t = 4.90 on 4 df, 95 % CI 4 ± 2.776 * sqrt(2/3);
    # paired by seed the differences are 4, 5, 3: t = 4 / (1 / sqrt(3)) = 6.93 on 2 df
    assert (
        '| mobilenetv2 | `mobilenetv2_100_nam` | `mobilenetv2_100` | +4.00 | [+1.73, +6.27] | 0.008 | 0.020 | 3 vs 3 |'
    ) in summary
    assert (
        '| mobilenetv2 | `mobilenetv2_100_nam` | `mobilenetv2_100_se` | +5.00 | n/a | n/a | n/a | 3 vs 1 |' in summary
    )
    assert (tmp_path / 'top1.png').stat().st_size > 0

    text = doc.read_text()
    assert text.startswith(
        'intro\n<!-- study-table -->\nRecipes:\n\n- mobilenetv2: `--img-size 64`\n\n| family | model |'
    )
    assert text.endswith('<!-- /study-table -->\noutro\n')
    assert 'old numbers' not in text and '41.00 ± 1.00' in text and '[+1.73, +6.27]' in text


def test_doc_without_markers_is_an_error(summarize, tmp_path):
    runs = tmp_path / 'runs.csv'
    write_runs(runs, {'mobilenetv2_100': [40.0, 41.0]})
    doc = tmp_path / 'MODEL_CARD.md'
    doc.write_text('no block here\n')
    with pytest.raises(SystemExit, match='MODEL_CARD.md: no <!-- study-table -->'):
        summarize.main(['--csv', str(runs), '--docs', str(doc)])
    assert doc.read_text() == 'no block here\n'


def test_a_second_recipe_forms_its_own_groups(summarize, tmp_path):
    runs = tmp_path / 'runs.csv'
    write_runs(runs, {'mobilenetv2_100': [40.0, 41.0, 42.0], 'mobilenetv2_100_nam': [44.0, 46.0, 45.0]}, recipe='old')
    write_runs(runs, {'mobilenetv2_100': [50.0, 52.0]}, recipe='new --sched-on-updates', append=True)
    summarize.main(['--csv', str(runs), '--docs'])
    summary = (tmp_path / 'summary.md').read_text()
    assert (
        '- mobilenetv2, recipe 1: `old`' in summary and '- mobilenetv2, recipe 2: `new --sched-on-updates`' in summary
    )
    assert '| mobilenetv2, recipe 1 | `mobilenetv2_100` | 3 | 41.00 ± 1.00 |' in summary
    assert '| mobilenetv2, recipe 2 | `mobilenetv2_100` | 2 | 51.00 ± 1.41 |' in summary
    # NAM is compared only with the baseline of its own recipe
    assert '| mobilenetv2, recipe 1 | `mobilenetv2_100_nam` | `mobilenetv2_100` | +4.00 |' in summary
    assert summary.count('| `mobilenetv2_100_nam` | `mobilenetv2_100` |') == 1


def test_speed_is_reported_per_kind_of_machine(summarize):
    rows = [
        dict(train_img_s=80, device='cpu (AMD EPYC)'),
        dict(train_img_s=90, device='cpu (Intel Xeon)'),
        dict(train_img_s=1600, device='cuda:0 (NVIDIA H200)'),
    ]
    assert summarize.speed_cell(rows) == '85 (CPU), 1600 (GPU)'
    assert summarize.speed_cell([dict(train_img_s=100)]) == '100'  # rows made before the device column


def test_a_variant_is_compared_with_the_model_it_varies(summarize, tmp_path):
    runs = tmp_path / 'runs.csv'
    variant = 'mobilenetv2_100_nam:nam_weighting=mean'
    write_runs(
        runs,
        {
            'mobilenetv2_100': [40.0, 41.0, 42.0],
            'mobilenetv2_100_nam': [44.0, 46.0, 45.0],
            'mobilenetv2_100_nam_chsp': [43.0, 43.0, 43.0],
            variant: [46.0, 48.0, 47.0],
        },
    )
    summarize.main(['--csv', str(runs), '--docs'])
    summary = (tmp_path / 'summary.md').read_text()
    assert f'| mobilenetv2 | `{variant}` | `mobilenetv2_100_nam` | +2.00 |' in summary
    assert f'| mobilenetv2 | `{variant}` | `mobilenetv2_100` | +6.00 |' in summary
    # another NAM model is not a baseline: only the variant's own base is compared
    assert f'`{variant}` | `mobilenetv2_100_nam_chsp`' not in summary
    assert '| `mobilenetv2_100_nam` | `mobilenetv2_100_nam_chsp`' not in summary


def test_the_controls_are_compared_with_the_plain_network_and_nam_with_them(summarize, tmp_path):
    runs = tmp_path / 'runs.csv'
    write_runs(
        runs,
        {
            'mobilenetv2_100': [40.0, 41.0, 42.0],
            'mobilenetv2_100_se': [39.0, 40.0, 41.0],
            'mobilenetv2_100_half': [37.0, 38.0, 39.0],
            'mobilenetv2_100_nam': [38.0, 39.0, 40.0],
        },
    )
    summarize.main(['--csv', str(runs), '--docs'])
    summary = (tmp_path / 'summary.md').read_text()
    assert '| mobilenetv2 | `mobilenetv2_100_half` | `mobilenetv2_100` | -3.00 |' in summary
    assert '| mobilenetv2 | `mobilenetv2_100_nam` | `mobilenetv2_100_half` | +1.00 |' in summary
    assert '`mobilenetv2_100_se` | `mobilenetv2_100`' not in summary  # a baseline is no control


def test_finetune_summary_compares_each_nam_start_with_the_plain_fine_tune(tmp_path):
    finetune = load_script('finetune_study')
    fields = ['model', 'seed', 'epochs', 'top1', 'top5', 'recipe']
    rows = {'resnet18_nam': [71.0, 72.5, 72.5], 'resnet18': [70.0, 71.0, 72.0]}
    rows['resnet18_nam:nam_weighting=mean'] = [72.0, 73.0, 73.5]
    runs = tmp_path / 'runs.csv'
    with open(runs, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for seed in range(3):  # rows land seed by seed, as the study writes them
            for model, values in rows.items():
                writer.writerow(dict(model=model, seed=seed, epochs=5, top1=values[seed], top5=95.0, recipe='-b 64'))
    finetune.summarize(runs)
    summary = (tmp_path / 'summary.md').read_text()
    assert '| `resnet18` | 3 | 5 | 71.00 ± 1.00 | 95.00 ± 0.00 | 0: 70.00, 1: 71.00, 2: 72.00 |' in summary
    # paired differences 1.0, 1.5, 0.5: t = 1 / (0.5 / sqrt 3) = 3.464 on 2 df, two-sided p = 1 - t / sqrt(2 + t²)
    line = next(x for x in summary.splitlines() if x.startswith('| resnet18 | `resnet18_nam` | `resnet18` |'))
    assert '| +1.00 |' in line and line.split('|')[7].strip() == '0.074'
    # a variant against plain and against the model it varies (paired differences 1.0, 0.5, 1.0: t = 5.0, p = 0.038)
    assert '| resnet18 | `resnet18_nam:nam_weighting=mean` | `resnet18` | +1.83 |' in summary
    line = next(x for x in summary.splitlines() if '| `resnet18_nam:nam_weighting=mean` | `resnet18_nam` |' in x)
    assert '| +0.83 |' in line and line.split('|')[7].strip() == '0.038'
