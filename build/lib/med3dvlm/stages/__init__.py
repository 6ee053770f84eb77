"""Training stages as LightningModules (siglip, pretrain, finetune); they orchestrate components
built from configs and hold no architecture themselves."""
