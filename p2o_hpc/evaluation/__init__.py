"""Evaluation with the paper's protocol (the Qwen2.5-Math suite): benchmarks and gold answers, generation and
grading into resumable per-problem records, the Table-1 report. The command line is p2o_hpc.eval."""
