"""fedlpp: federated LoRA fine-tuning that protects both the data and the model."""
