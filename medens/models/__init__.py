"""LightningModules and networks, one module per modality over a shared base."""
