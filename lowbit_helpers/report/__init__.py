"""Tables, figures and the markdown summary, read from a run's recorded outputs: one module per report section.

* :mod:`.headline`: the answer (what to ship per target), the picks' detections and per-class change;
* :mod:`.baseline`: the model, FP32 baseline, parity and per-class tables (notebooks 01, 02);
* :mod:`.int8`: the INT8 table, engines, emulation, latency breakdown and conclusion (notebook 03);
* :mod:`.sensitivity`: the sensitivity tables and figures (notebook 04);
* :mod:`.candidates`: the ladder, verdicts, guided-vs-random and Pareto figures (notebook 05);
* :mod:`.detections`: side-by-side detections of the picks;
* :mod:`.sections`: the sections in their one order (notebook 06 and ``summary.md`` both walk it);
* :mod:`.summary`: notebook 06's ``summary.md`` and the README's results block;
* :mod:`.provenance`: the artifacts' SHA-256 and where the run's time went;
* :mod:`.browser`: the rendered report as headless Chromium shows it (the tests' browser check);
* :mod:`.common`: formatting shared by the tables.
"""
