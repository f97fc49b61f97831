"""What is done with runs: sweeps of runs, the model-stealing attack on a run, the evaluation of a finished run."""
