"""The papers' protocols on trained runs: evaluation on the run's own caches and on other data
(cross-dataset, domain shift, base-to-new), sweeps over methods x shots x noise x seeds, their
paper-style reports and plots, and the statistics the tables use."""
