"""The study on real pretrained models: the plan and its runner (`study`), the computed
report and verdict (`report`), and the runs' kept files (`runs/`).

    python -m benchmarks.real_study [--only=NAME] [--methods=phase] [--report_only]
"""
