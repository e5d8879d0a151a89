"""The compression studies: every table method at every memory budget, trained and tested.

`grid` says what a study runs (StudyConfig, its cells), `tables` turns a method and a budget into
TableConfigs, `runner` trains and tests the cells, `results` keeps them in a resumable JSON
file, `report` turns them into summary keys, a Markdown table and a Pareto plot. The CLI is
`embtab bench compression` / `embtab bench retrieval`; docs/compression.md has the findings.
"""
