"""`topk-bench compare`: one report across suites, datasets and devices, read from run records only.

records.py loads and validates records into problems and cells; tables.py, stats.py and analysis.py
compute the summary, ranks and tests, profiles, cost and differences to a baseline; goals.py turns them
into cited sentences; figures.py, render.py and report.py write compare.md, compare.html, CSVs, figures.
"""
