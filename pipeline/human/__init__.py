"""Human evaluation: blind A/B studies of the pipeline's own outputs, annotated in a browser, aggregated with
the SIPO paper's two-stage majority, and exported back as preference pairs for training.

    study.py      build a study folder from two models / run directories, or from a pairs dataset
    store.py      the study database (SQLite, WAL): items, annotators, assignments, votes
    server.py     the annotation web app (Starlette + uvicorn, 127.0.0.1 by default)
    aggregate.py  two-stage majority, win rate, agreement, quality control
    report.py     the Markdown report and its plot
    export.py     human labels → a pairs dataset in the project's Parquet schema
    labelstudio.py  Label Studio tasks out, Label Studio results in
"""
