"""The study's grid as a job graph: plan the jobs (extraction, probe sweeps, finetunes) and run them on an executor."""
