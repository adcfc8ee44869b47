"""The ablation study (a project that uses the library): Tune-A-Video against APLA and its ablations over the
shapes-world benchmark clips, as a plan of ordinary train.py / sample.py runs. See README.md beside this file.

    clips.py      the benchmark: seeded candidate clips, the selection rule, the record (clips.json)
    measures.py   what one finished run measured (RUN/measures.json)
    plan.py       the variants, the runs and each run's shell line
    executor.py   the built-in local executor of the lines (`run --jobs N`)
    report.py     the statistics and REPORT.md
    selection.py  running the selection rule (`select`)
    __main__.py   the command line: plan, run, report, measure, select
"""
