"""What every stage shares: errors as sentences, atomic files, the machine, MLflow, config schemas."""
