"""Transfer: exported encoders → segmentation networks → fine-tuning, evaluation and comparison."""
