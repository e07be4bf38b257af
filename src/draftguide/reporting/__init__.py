"""Run folders, figures and the cross-run report: JSON/JSONL IO, plots, `draftguide report`."""
