"""Fine-tuning with masks fixed: runtime install, graph preparation, worker, QAT, folding, evaluation."""
