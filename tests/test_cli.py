"""The timm-nam command's wiring: what each subcommand writes and the exit codes a script relies on."""

import pytest

import timm_nam.tables as tables
from timm_nam.cli import main


@pytest.fixture
def one_row_tables(monkeypatch):
    """Tables 1-2 cut to one resnet18_nam row each (the full tables build every model), counted against ``paper``."""

    def use(paper_params_m, paper_flops_g):
        row = tables.PaperRow('ResNet 18 + NAM', 'resnet18_nam', paper_params_m, paper_flops_g)
        monkeypatch.setattr(tables, 'TABLE1', (row,))
        monkeypatch.setattr(tables, 'TABLE2', ())

    return use


def test_tables_writes_the_file_and_exits_0_when_every_row_matches(one_row_tables, tmp_path, capsys):
    measured = tables.measure_rows((tables.PaperRow('', 'resnet18_nam', None, None),))[0]
    one_row_tables(round(measured['params'] / 1e6, 2), round(measured['paper_flops'] / 1e9, 2))
    out = tmp_path / 'tables.md'
    assert main(['tables', '-o', str(out)]) == 0
    printed = capsys.readouterr()
    assert out.read_text() + '\n' == printed.out and printed.err == ''
    assert '| ResNet 18 + NAM | `resnet18_nam` |' in out.read_text()


def test_tables_exits_1_and_names_the_rows_that_do_not_match(one_row_tables, tmp_path, capsys):
    one_row_tables(1.00, 1.00)  # a count resnet18_nam does not have
    out = tmp_path / 'tables.md'
    assert main(['tables', '-o', str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.err == 'Rows that do not match the paper: ResNet 18 + NAM\n'
    assert out.read_text() + '\n' == printed.out  # the file is written all the same
    row = next(line for line in out.read_text().splitlines() if line.startswith('| ResNet 18 + NAM |'))
    assert row.split('|')[-2].strip() == 'NO'
