"""One LightningModule per pre-training method; each only wires building blocks together."""
