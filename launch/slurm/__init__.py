"""Slurm through submitit: job parameters and checks (params), the task inside the job (task), submitting and
following (monitor), and the job's status file (status). The only place that knows Slurm."""
