"""Every table, report and figure a user reads, in one package; the stages compute, these modules present.

- ``data``: the data report (Markdown and figure) and the trained-token marking ``inspect-labels`` prints.
- ``evaluation``: the base-vs-tuned table, the evaluation report, the loss curve and the comparison chart.
- ``tables``: the preflight plan and the trainable-parameter table, as printed to the terminal and the log.
"""
