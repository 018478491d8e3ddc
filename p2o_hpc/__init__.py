"""p2o_hpc: P²O (Joint Policy and Prompt Optimization) on Megatron learners, vLLM generators and SLURM."""

__version__ = "0.1.0"
