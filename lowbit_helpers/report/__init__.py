"""Tables, figures and the markdown summary, all read from a run's recorded outputs: one module per report section.

* :mod:`.baseline`: the model, FP32 baseline and parity tables (notebooks 01, 02);
* :mod:`.int8`: the INT8 table, latency breakdown and conclusion (notebook 03);
* :mod:`.sensitivity`: the sensitivity tables and figures (notebook 04);
* :mod:`.summary`: notebook 06's ``summary.md``, provenance, and the README's results block;
* :mod:`.common`: formatting shared by the tables.
"""
