"""Blind A/B human evaluation of the pipeline's models, and human labels back into training.

    python jobs/human_study.py create --out runs/study                      # runs/iterative_sipo vs the reference
    python jobs/human_study.py create --out runs/s2 --set model_a=runs/a model_b=runs/b seeds_per_prompt=2
    python jobs/human_study.py create --out runs/s3 --set source=pairs pairs=runs/pairs max_items=200
    python jobs/human_study.py serve --study runs/study                      # http://127.0.0.1:8000, links.md
    python jobs/human_study.py report --study runs/study                    # runs/study/report/report.md
    python jobs/human_study.py export-pairs --study runs/study --out runs/human_pairs
    python jobs/train.py --pairs runs/human_pairs --out runs/train_human
    python jobs/human_study.py labelstudio-export --study runs/study --out runs/study_ls
    python jobs/human_study.py labelstudio-import --study runs/study --results export.json --mapping runs/study_ls/mapping.json

The protocol is the SIPO paper's human study (appendix E): every item is one prompt with one sample from each
system on the same seed; ``groups`` groups of ``annotators_per_group`` people (default 3 × 4) each annotate
every item, in a random order per group, with left/right drawn per item; a person answers "A", "B" or "tie"
(or skips). The report takes the majority within each group (a shared top, such as 2–2, is a tie), then the
strict majority across groups (none is a tie), and gives the win rate with ties as ½ and a bootstrap interval
over prompts, agreement (Fleiss' κ), and the annotators excluded by quality control. docs/human_eval.md has the
details. Every command takes ``--help`` and ``--print-config`` (``create``: the resolved StudyConfig tree; the
others: their options), which prints and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="sample two models (or read a pairs dataset) into a new study folder")
    c.add_argument("--out", type=Path, required=True, help="the study folder (must not exist, or be empty)")
    c.add_argument("--config", type=Path, help="JSON or YAML file of StudyConfig fields (pipeline/human/study.py)")
    c.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a field by its dotted path, e.g. model_a=runs/x sampler.num_steps=20 (repeatable)")
    c.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    c.add_argument("--base-url", default="http://127.0.0.1:8000", help="the address written into links.md")
    c.set_defaults(recipe="defaults")

    s = sub.add_parser("serve", help="serve the annotation app (127.0.0.1 unless --host says otherwise)")
    s.add_argument("--study", type=Path, required=True, help="a study folder made by `create`")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)

    r = sub.add_parser("report", help="aggregate the votes: report.md, report.png, result.json")
    r.add_argument("--study", type=Path, required=True)
    r.add_argument("--out", type=Path, help="report folder (default: STUDY/report)")

    e = sub.add_parser("export-pairs", help="the final labels as a pairs dataset for jobs/train.py")
    e.add_argument("--study", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)

    le = sub.add_parser("labelstudio-export", help="the study as Label Studio tasks (pairwise template)")
    le.add_argument("--study", type=Path, required=True)
    le.add_argument("--out", type=Path, required=True)

    li = sub.add_parser("labelstudio-import", help="votes from a Label Studio JSON export")
    li.add_argument("--study", type=Path, required=True)
    li.add_argument("--results", type=Path, required=True, help="Label Studio's JSON export of the project")
    li.add_argument("--mapping", type=Path, required=True, help="mapping.json written by labelstudio-export")

    for parser in (s, r, e, le, li):
        parser.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    return p.parse_args(argv)


def _create(args) -> int:
    from pipeline.cli import resolve
    from pipeline.human.study import LINKS_FILE, StudyConfig, create_study

    cfg = resolve(args, StudyConfig)
    meta = create_study(cfg, args.out, base_url=args.base_url.rstrip("/"))
    systems = meta["systems"]
    print(f"study {meta['name']!r}: {meta['num_items']} items on {meta['num_prompts']} prompts, A = "
          f"{systems['A']['name']}, B = {systems['B']['name']}; {cfg.groups} groups × {cfg.annotators_per_group} "
          f"annotators")
    print(f"wrote {args.out}/ (links: {args.out / LINKS_FILE}); next: python jobs/human_study.py serve --study {args.out}")
    return 0


def _serve(args) -> int:
    from pipeline.human.server import serve
    from pipeline.human.store import ADMIN_FILE, LINKS_FILE, open_study

    store = open_study(args.study)
    meta, people = store.meta(), store.annotators()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this address and holds a link can vote",
              file=sys.stderr)
    print(f"serving study {meta['name']!r} ({meta['num_items']} items, {len(people)} annotators) at "
          f"http://{args.host}:{args.port}; links: {args.study / LINKS_FILE}; admin token: "
          f"{args.study / ADMIN_FILE}; Ctrl-C stops", flush=True)
    serve(store.path, host=args.host, port=args.port)
    return 0


def _report(args) -> int:
    from pipeline.human.aggregate import aggregate_study
    from pipeline.human.report import write_report
    from pipeline.human.store import open_study
    from pipeline.reporting import fmt_ci

    store = open_study(args.study)
    if not store.votes():
        raise SystemExit(f"error: {args.study} has no votes yet; serve it (python jobs/human_study.py serve --study "
                         f"{args.study}) and hand out the links in {args.study / 'links.md'}")
    meta, result = store.meta(), aggregate_study(store)
    out = args.out or args.study / "report"
    names = {k: v["name"] for k, v in meta["systems"].items()}
    path = write_report(result, out, names=names, title=f"Human study {meta['name']!r}")
    print(f"{names['A']} vs {names['B']}: win rate {fmt_ci(result['win_rate'])} over {result['num_labelled']} of "
          f"{result['num_items']} items; excluded annotators: {', '.join(result['qc']['excluded']) or 'none'}")
    print(f"wrote {path}")
    return 0


def _export_pairs(args) -> int:
    from pipeline.human.aggregate import aggregate_study
    from pipeline.human.export import export_pairs
    from pipeline.human.store import open_study

    store = open_study(args.study)
    manifest = export_pairs(store, aggregate_study(store), args.out)
    print(f"wrote {manifest['num_pairs']} pairs to {args.out} (labels {manifest['labels']}; ties dropped); "
          f"train with: python jobs/train.py --pairs {args.out} --out runs/train_human")
    return 0


def _labelstudio_export(args) -> int:
    from pipeline.human.labelstudio import export_tasks
    from pipeline.human.store import open_study

    path = export_tasks(open_study(args.study), args.out)
    print(f"wrote {path} and the labeling config beside it; keep mapping.json private (it says which side is which)")
    return 0


def _labelstudio_import(args) -> int:
    from pipeline.human.labelstudio import import_results
    from pipeline.human.store import open_study

    counts = import_results(open_study(args.study), args.results, args.mapping)
    print(f"imported {json.dumps(counts)}")
    return 0


def main(argv=None) -> int:
    from pipeline.cli import print_options_if_asked
    from pipeline.human.store import StudyError
    from pipeline.utils.driver import offline_mode

    offline_mode()  # before torch / diffusers / transformers are imported
    args = parse_args(argv)
    if args.command != "create":
        print_options_if_asked(args)
    run = {"create": _create, "serve": _serve, "report": _report, "export-pairs": _export_pairs,
           "labelstudio-export": _labelstudio_export, "labelstudio-import": _labelstudio_import}[args.command]
    try:
        return run(args)
    except (StudyError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    raise SystemExit(main())
