"""`embtab demo`: the three paths of the system run together on one data set, with a report.

config: what a run does (default and --quick); pipeline: the stages; load: the scoring client;
console: the live status line; report: report.md and its plots.
"""
