"""The quality study that study.py runs: its options (options.py), its stages (stages.py), metrics.json
(results.py), and the report, plot and table made from it (render.py)."""
