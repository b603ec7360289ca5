""" The ``timm-nam`` command (also ``python -m timm_nam``).

    timm-nam            same as ``timm-nam tables``
    timm-nam tables     print the paper's Tables 1-4 recomputed from the models (no data needed)
"""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _cmd_tables(args) -> int:
    from .tables import TABLE1, TABLE2, measure_rows, overhead_rows, render_tables
    table1, table2 = measure_rows(TABLE1), measure_rows(TABLE2)
    text = render_tables(table1, table2, overhead_rows())
    print(text)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text)
    mismatches = [m['row'].label for m in table1 + table2 if not (m['params_ok'] and m['flops_ok'])]
    if mismatches:
        print(f'Rows that do not match the paper: {", ".join(mismatches)}', file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-nam', description='NAM (Normalization-based Attention Module) for timm.')
    sub = parser.add_subparsers(dest='command')
    tables = sub.add_parser('tables', help="print the paper's Tables 1-4 (params, FLOPs, overheads)")
    tables.add_argument('--output', '-o', help='also write the markdown to this file')
    tables.set_defaults(func=_cmd_tables)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(['tables'] + list(argv if argv is not None else sys.argv[1:]))
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
